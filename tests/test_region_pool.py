"""RoIAlign against a plain loop of torchvision's algorithm (written here), gradients, masking, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cloc_jax.models.region_pool import roi_align


def _bilinear(feat, y, x):
    """torchvision's bilinear_interpolate for one sample point; feat [H, W, C]."""
    height, width = feat.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feat.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * feat[y_low, x_low]
        + hy * lx * feat[y_low, x_high]
        + ly * hx * feat[y_high, x_low]
        + ly * lx * feat[y_high, x_high]
    )


def reference_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision.ops.roi_align's CPU kernel as loops, in float64; features [B, H, W, C]."""
    out = np.zeros((*boxes.shape[:2], output_size, output_size, features.shape[-1]))
    offset = 0.5 if aligned else 0.0
    for b in range(boxes.shape[0]):
        for m in range(boxes.shape[1]):
            x1, y1, x2, y2 = boxes[b, m] * spatial_scale - offset
            roi_w, roi_h = x2 - x1, y2 - y1
            if not aligned:
                roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
            bin_h, bin_w = roi_h / output_size, roi_w / output_size
            for ph in range(output_size):
                for pw in range(output_size):
                    acc = np.zeros(features.shape[-1])
                    for iy in range(sampling_ratio):
                        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                        for ix in range(sampling_ratio):
                            x = x1 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                            acc += _bilinear(features[b], y, x)
                    out[b, m, ph, pw] = acc / sampling_ratio**2
    return out


def _case(seed=0, height=9, width=11, m=7):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, height, width, 3))
    corners = rng.uniform(-20, 60, size=(2, m, 2, 2))  # input pixels at spatial_scale 1/4: partly outside
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1)[..., [0, 1, 2, 3]]
    boxes[0, 0] = [8.0, 8.0, 8.6, 8.3]  # sub-pixel box
    boxes[1, 1] = [-30.0, -30.0, -10.0, -5.0]  # entirely outside
    boxes[1, 2] = [0.0, 0.0, 44.0, 36.0]  # the whole map
    return features, boxes


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio,output_size", [(2, 7), (1, 3), (3, 2)])
def test_matches_torchvision_loops(aligned, sampling_ratio, output_size):
    features, boxes = _case()
    want = reference_roi_align(features, boxes, output_size, 0.25, sampling_ratio, aligned)
    got = roi_align(
        jnp.asarray(features, jnp.float32),
        jnp.asarray(boxes, jnp.float32),
        output_size,
        spatial_scale=0.25,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(want).max() > 0.1  # the case is not trivially zero


def test_padding_gives_zeros_and_no_gradient():
    features, boxes = _case(1)
    mask = np.ones(boxes.shape[:2], bool)
    mask[0, 3:] = False
    f, b = jnp.asarray(features, jnp.float32), jnp.asarray(boxes, jnp.float32)
    out = roi_align(f, b, 4, 0.25, mask=jnp.asarray(mask))
    assert np.all(np.asarray(out)[~mask] == 0)
    np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(roi_align(f, b, 4, 0.25))[mask], atol=1e-6)
    grads = jax.grad(lambda x: roi_align(x, b, 4, 0.25, mask=jnp.asarray(mask))[0, 3:].sum())(f)
    assert np.all(np.asarray(grads) == 0)


def test_gradients_with_respect_to_features_are_numerically_right():
    features, boxes = _case(2, height=5, width=6, m=3)
    with jax.enable_x64(True):  # float64 so finite differences are exact enough for tight tolerances
        fn = lambda x: roi_align(x, jnp.asarray(boxes, jnp.float64), 3, 0.125)  # noqa: E731
        check_grads(fn, (jnp.asarray(features, jnp.float64),), order=2, modes=("fwd", "rev"))


def test_jit_and_static_shapes():
    features, boxes = _case(3)
    out = jax.jit(lambda f, b: roi_align(f, b, (2, 5), 0.25))(features.astype(np.float32), boxes.astype(np.float32))
    assert out.shape == (2, 7, 2, 5, 3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(output_size=0), "output_size must be positive"),
        (dict(output_size=2, sampling_ratio=-1), "sampling_ratio must be a positive integer"),
        (dict(output_size=2, boxes=np.zeros((2, 3, 5))), r"boxes must be \[B=2, M, 4\]"),
        (dict(output_size=2, boxes=np.zeros((3, 4))), r"boxes must be \[B=2, M, 4\]"),
    ],
)
def test_bad_arguments_are_one_line(kwargs, message):
    features, boxes = _case()
    kwargs.setdefault("boxes", boxes)
    with pytest.raises(ValueError, match=message):
        roi_align(jnp.asarray(features), jnp.asarray(kwargs.pop("boxes")), **kwargs)
