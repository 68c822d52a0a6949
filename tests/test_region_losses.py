"""Region-text and grounding losses against float64 NumPy loops, with padding, filtering and bad boxes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cloc_jax.losses import grounding_loss, region_text_loss, training_loss


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def region_reference(zr, zt, valid, scale, threshold):
    """Loop over valid regions; a negative j is kept for i unless their texts are more similar than threshold."""
    idx = [i for i in range(len(zr)) if valid[i]]
    total = 0.0
    for i in idx:
        negatives = [j for j in idx if j == i or zt[i] @ zt[j] <= threshold]
        row = np.array([scale * zr[i] @ zt[j] for j in negatives])
        col = np.array([scale * zr[j] @ zt[i] for j in negatives])
        pos = negatives.index(i)
        total += (np.log(np.exp(row).sum()) - row[pos]) + (np.log(np.exp(col).sum()) - col[pos])
    return total / (2 * max(len(idx), 1))


def clip_reference(zimg, ztxt, scale):
    """Symmetric InfoNCE, float64: image i's positive is text i among all texts, and text i's is image i."""
    total = 0.0
    for i in range(len(zimg)):
        row = np.array([scale * zimg[i] @ ztxt[j] for j in range(len(ztxt))])
        col = np.array([scale * zimg[j] @ ztxt[i] for j in range(len(zimg))])
        total += (np.log(np.exp(row).sum()) - row[i]) + (np.log(np.exp(col).sum()) - col[i])
    return total / (2 * len(zimg))


@pytest.mark.parametrize("threshold", [0.9, 0.3, 2.0])
def test_region_text_loss_matches_reference_with_padding_and_filtering(threshold):
    rng = np.random.default_rng(0)
    zr, zt = _unit(rng, 12, 6), _unit(rng, 12, 6)
    zt[5] = zt[2]  # two regions with the same text: filtered as each other's negatives
    valid = np.array([True] * 9 + [False] * 3)
    got = region_text_loss(jnp.asarray(zr, jnp.float32), jnp.asarray(zt, jnp.float32), valid, 7.0, threshold)
    assert float(got) == pytest.approx(region_reference(zr, zt, valid, 7.0, threshold), rel=1e-5)


def test_padded_regions_change_nothing_and_no_regions_is_zero():
    rng = np.random.default_rng(1)
    zr, zt = _unit(rng, 6, 4).astype(np.float32), _unit(rng, 6, 4).astype(np.float32)
    valid = np.array([True, True, True, False, False, False])
    a = region_text_loss(zr, zt, valid, 5.0)
    zr2, zt2 = zr.copy(), zt.copy()
    zr2[3:], zt2[3:] = _unit(rng, 3, 4), _unit(rng, 3, 4)
    assert float(region_text_loss(zr2, zt2, valid, 5.0)) == pytest.approx(float(a), rel=1e-6)
    assert float(region_text_loss(zr, zt, np.zeros(6, bool), 5.0)) == 0.0
    grads = jax.grad(lambda z: region_text_loss(z, zt, valid, 5.0))(jnp.asarray(zr))
    assert np.all(np.asarray(grads)[3:] == 0)


def _giou_reference(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_grounding_losses_match_reference():
    rng = np.random.default_rng(2)
    lo = rng.uniform(0, 0.5, (8, 2, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.4, (8, 2, 2))], -1)
    pred, target = boxes[:, 0], boxes[:, 1]
    valid = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    l2 = np.mean([np.sum((pred[i] - target[i]) ** 2) for i in range(8) if valid[i]])
    l1g = np.mean(
        [np.abs(pred[i] - target[i]).sum() + 1 - _giou_reference(pred[i], target[i]) for i in range(8) if valid[i]]
    )
    p32, t32 = pred.astype(np.float32), target.astype(np.float32)
    assert float(grounding_loss(p32, t32, valid, "l2")) == pytest.approx(l2, rel=1e-5)
    assert float(grounding_loss(p32, t32, valid, "l1_giou")) == pytest.approx(l1g, rel=1e-5)
    with pytest.raises(ValueError, match=r"region_loss\.grounding='l3'"):
        grounding_loss(p32, t32, valid, "l3")


def test_total_loss_weights_regions_by_the_fraction_of_images_that_have_them():
    rng = np.random.default_rng(3)
    b, m = 4, 2
    out = dict(
        zimg=_unit(rng, b, 4).astype(np.float32),
        ztxt=_unit(rng, b, 4).astype(np.float32),
        scale=jnp.float32(5.0),
        zregion=_unit(rng, b * m, 4).reshape(b, m, 4).astype(np.float32),
        zregion_text=_unit(rng, b * m, 4).reshape(b, m, 4).astype(np.float32),
        pred_boxes=np.full((b, m, 4), 0.25, np.float32),
    )
    boxes = np.tile(np.array([0.1, 0.1, 0.6, 0.6], np.float32), (b, m, 1))
    boxes[3, 0] = np.nan  # bad input that slipped past the pipeline: masked, never poisons the loss
    mask = np.array([[True, True], [True, False], [False, False], [True, False]])
    cfg = ml_collections.ConfigDict(dict(weight=2.0, filter_threshold=0.9, grounding="l2", grounding_weight=0.5))
    loss, parts = training_loss(out, dict(boxes=boxes, region_mask=mask), cfg)
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    image_text = clip_reference(f64(out["zimg"]), f64(out["ztxt"]), 5.0)
    # Usable regions, flattened: (0, 0), (0, 1), (1, 0); (3, 0) has a NaN box, the rest are masked.
    valid = np.array([True, True, True, False, False, False, False, False])
    region = region_reference(
        f64(out["zregion"]).reshape(8, 4), f64(out["zregion_text"]).reshape(8, 4), valid, 5.0, 0.9
    )
    # Each usable box is (0.1, 0.1, 0.6, 0.6) predicted as 0.25 everywhere: 2 x 0.15^2 + 2 x 0.35^2 = 0.29.
    grounding = 0.29
    lam = 2.0 * 2 / 4  # weight 2 x images 0 and 1 of 4 have usable regions (image 3's only region is NaN)
    assert float(parts["loss/image_text"]) == pytest.approx(image_text, rel=1e-5)
    assert float(parts["loss/region"]) == pytest.approx(region, rel=1e-5)
    assert float(parts["loss/grounding"]) == pytest.approx(grounding, rel=1e-5)
    want = image_text + lam * (region + 0.5 * grounding)
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(want, rel=1e-5)
