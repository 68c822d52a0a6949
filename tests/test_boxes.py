import numpy as np
import pytest

from cloc_jax.boxes import cxcywh_to_xyxy, iou_and_giou, referring_expressions, repair


def _reference(a, b):
    """IoU and GIoU of two boxes, float64, by the definitions."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    union = area_a + area_b - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def test_iou_and_giou_match_the_definitions_in_numpy_and_jax():
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 0.7, (200, 2, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.01, 0.3, (200, 2, 2))], axis=-1).astype(np.float32)
    a, b = boxes[:, 0], boxes[:, 1]
    want = np.array([_reference(x.astype(np.float64), y.astype(np.float64)) for x, y in zip(a, b)])
    for got in (iou_and_giou(a, b), iou_and_giou(__import__("jax").numpy.asarray(a), b)):
        np.testing.assert_allclose(np.asarray(got[0]), want[:, 0], atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[1]), want[:, 1], atol=1e-5)
    assert float(iou_and_giou(a[:1], a[:1])[0][0]) == pytest.approx(1.0)


def test_cxcywh_to_xyxy():
    np.testing.assert_allclose(cxcywh_to_xyxy(np.array([0.5, 0.5, 0.2, 0.4])), [0.4, 0.3, 0.6, 0.7])


def test_repair_reorders_clips_and_drops():
    boxes = np.array(
        [
            [0.6, 0.2, 0.1, 0.5],  # x2 < x1: reordered
            [-0.2, 0.1, 1.4, 0.9],  # outside [0, 1]: clipped
            [np.nan, 0.1, 0.2, 0.3],  # NaN: dropped
            [0.3, 0.3, 0.3, 0.6],  # zero width: dropped
            [1.2, 0.1, 1.5, 0.4],  # entirely outside: zero width after clipping, dropped
        ]
    )
    fixed, keep = repair(boxes)
    np.testing.assert_array_equal(keep, [True, True, False, False, False])
    np.testing.assert_allclose(fixed[0], [0.1, 0.2, 0.6, 0.5])
    np.testing.assert_allclose(fixed[1], [0.0, 0.1, 1.0, 0.9])
    assert np.isfinite(fixed).all()


def test_referring_expressions_name_the_nearest_neighbour_and_the_dominant_direction():
    boxes = np.array(
        [
            [0.0, 0.0, 0.2, 0.2],  # centre (0.1, 0.1)
            [0.5, 0.05, 0.7, 0.25],  # (0.6, 0.15): right of the first, |dx| > |dy|
            [0.55, 0.7, 0.65, 0.8],  # (0.6, 0.75): below the second, its nearest
        ]
    )
    assert referring_expressions(boxes, ["a", "b", "c"]) == [
        "the a left of the b",
        "the b right of the a",
        "the c below the b",
    ]
    assert referring_expressions(boxes[:1], ["a"]) == ["the a"]
    assert referring_expressions(boxes[[2, 1]], ["c", "b"])[1] == "the b above the c"
