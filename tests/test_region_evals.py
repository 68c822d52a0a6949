import numpy as np
import pytest

from cloc_jax.evals.ranking import mean_class_accuracy
from cloc_jax.evals.regions import (
    CropClassification,
    Grounding,
    RegionClassification,
    RegionRetrieval,
    crop_and_resize,
    same_text,
)
from tests.fake_eval import run


def test_mean_class_accuracy_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    assert mean_class_accuracy(pred == labels, labels) == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    unknown = np.array([-1, -1, -1])  # label -1 is no class: it adds none and changes none
    got = mean_class_accuracy(np.concatenate([pred == labels, [True] * 3]), np.concatenate([labels, unknown]))
    assert got == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)


def test_crop_and_resize_reference():
    image = np.arange(4 * 6 * 1, dtype=np.float32).reshape(4, 6, 1)
    whole = crop_and_resize(image, np.array([0, 0, 1, 1]), 4)
    # Resizing the full 4x6 image to 4x4: rows unchanged, columns at x = (j + 0.5) * 1.5 - 0.5.
    xs = (np.arange(4) + 0.5) * 1.5 - 0.5
    np.testing.assert_allclose(whole[:, :, 0], np.arange(4)[:, None] * 6 + xs[None, :], atol=1e-5)
    cell = crop_and_resize(image, np.array([2 / 6, 1 / 4, 3 / 6, 2 / 4]), 1)  # exactly pixel (1, 2)
    assert cell[0, 0, 0] == pytest.approx(image[1, 2, 0])


class FakeEncoder:
    """Regions embed to one-hot vectors of their colour channel; ground() returns preset boxes."""

    def __init__(self, boxes=None):
        self.boxes = boxes

    def encode_text(self, texts):
        if isinstance(texts, np.ndarray):  # token rows: the first token picks the axis
            return np.eye(3, dtype=np.float32)[texts[:, 0] % 3]
        return np.stack([np.eye(3, dtype=np.float32)[int(t.split()[-1])] for t in texts])

    def encode_regions(self, images, boxes):
        return np.eye(3, dtype=np.float32)[(boxes[..., 0] * 10).astype(int) % 3]

    def encode_image(self, images):  # a crop's mean colour picks the axis
        return np.eye(3, dtype=np.float32)[np.round(images.mean((1, 2, 3))).astype(int) % 3]

    def ground(self, images, tokens):
        return self.boxes


def _batch():
    boxes = np.zeros((2, 2, 4), np.float32)
    boxes[..., 2:] = 1.0
    boxes[0, 0, 0], boxes[0, 1, 0], boxes[1, 0, 0] = 0.0, 0.1, 0.2  # region axes 0, 1, 2
    return dict(
        image=np.zeros((2, 4, 4, 3), np.float32),
        boxes=boxes,
        region_mask=np.array([[True, True], [True, False]]),
        valid=np.array([True, True]),
        region_labels=np.array([[0, 2], [2, -1]]),
        region_tokens=np.array([[[0, 1], [1, 1]], [[2, 1], [0, 0]]]),
        ground_boxes=boxes,
        ground_tokens=np.zeros((2, 2, 2), np.int32),
        ground_mask=np.array([[True, True], [True, False]]),
    )


def test_region_classification_by_hand():
    results = run(RegionClassification(["c 0", "c 1", "c 2"], ("{}",)), FakeEncoder(), [_batch()])
    # predictions 0, 1, 2 against labels 0, 2, 2: class 0 right, class 2 half right.
    assert results["macc"] == pytest.approx((1 + 0.5) / 2) and results["acc"] == pytest.approx(2 / 3)


def test_crop_classification_encodes_each_valid_box():
    batch = _batch()
    batch["image"][0] = 2.0  # crops of image 0 predict class 2, of image 1 class 0
    results = run(CropClassification(["c 0", "c 1", "c 2"], ("{}",)), FakeEncoder(), [batch])
    # predictions 2, 2, 0 against labels 0, 2, 2 -> class 0: 0/1, class 2: 1/2
    assert results["macc_crop"] == pytest.approx(0.25)


def _batch_with_unknown_labels():
    """3 images x 4 slots; regions predict axis 0, 1, 2 by their x0 (0.0, 0.1, 0.2). Row 2 is padding."""
    x0 = np.array([[0.0, 0.1, 0.2, 0.0], [0.2, 0.0, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]], np.float32)
    boxes = np.zeros((3, 4, 4), np.float32)
    boxes[..., 0], boxes[..., 2:] = x0, 1.0
    return dict(
        image=np.zeros((3, 4, 4, 3), np.float32),
        boxes=boxes,
        region_mask=np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], bool),
        valid=np.array([True, True, False]),
        region_labels=np.array([[0, -1, 2, 2], [-1, 1, 1, 1], [0, 0, 0, 0]]),
    )


def _reference_macc(pairs):
    """(prediction, label) pairs of known regions -> (mAcc, accuracy), class by class."""
    pred, labels = np.array(pairs).T
    per_class = [np.mean(pred[labels == c] == c) for c in sorted(set(labels.tolist()))]
    return np.mean(per_class), np.mean(pred == labels)


def test_region_classification_leaves_unknown_labels_out():
    evaluator = RegionClassification(["c 0", "c 1", "c 2"], ("{}",))
    results = run(evaluator, FakeEncoder(), [_batch_with_unknown_labels()])
    # Known regions (prediction, label): image 0 -> (0, 0), (2, 2), (0, 2); image 1 -> (0, 1), (1, 1).
    macc, acc = _reference_macc([(0, 0), (2, 2), (0, 2), (0, 1), (1, 1)])
    assert (macc, acc) == pytest.approx(((1 + 1 / 2 + 1 / 2) / 3, 3 / 5))
    assert results == pytest.approx({"macc": macc, "acc": acc})


def test_crop_classification_leaves_unknown_labels_out():
    batch = _batch_with_unknown_labels()
    batch["image"][0] = 2.0  # crops of image 0 predict class 2, of image 1 class 0
    results = run(CropClassification(["c 0", "c 1", "c 2"], ("{}",)), FakeEncoder(), [batch])
    macc, _ = _reference_macc([(2, 0), (2, 2), (2, 2), (0, 1), (0, 1)])
    assert macc == pytest.approx((0 + 0 + 1) / 3) and results == pytest.approx({"macc_crop": macc})


@pytest.mark.parametrize("kind", [RegionClassification, CropClassification])
def test_region_classification_with_no_known_label_reports_no_metric(kind):
    batch = dict(_batch_with_unknown_labels(), region_labels=np.full((3, 4), -1))
    with pytest.warns(UserWarning, match="no sample has a known label"):
        assert run(kind(["c 0", "c 1", "c 2"], ("{}",)), FakeEncoder(), [batch]) == {}


def test_region_retrieval_counts_identical_texts_as_hits():
    ids = same_text(np.array([[1, 2], [3, 4], [1, 2]]))
    assert ids[0] == ids[2] != ids[1]
    results = run(RegionRetrieval(ks=(1,)), FakeEncoder(), [_batch()])
    assert results["r2t_r1"] == 1.0 and results["t2r_r1"] == 1.0


def test_grounding_accuracy_at_iou_half():
    batch = _batch()
    pred = batch["boxes"].copy()
    pred[0, 1] = [0.6, 0.0, 1.0, 1.0]  # IoU with [0.1, 0, 1, 1] is 0.4/0.9 < 0.5
    results = run(Grounding(), FakeEncoder(pred), [batch])
    assert results["acc50"] == pytest.approx(2 / 3)


def test_grounding_scores_every_expression_at_iou_just_above_and_below_half():
    # One image, one box [0, 0, 1, 1] referred to by three expressions, and a second box by one; padding row.
    gt = np.zeros((2, 4, 4), np.float32)
    gt[0, :3] = [0, 0, 1, 1]
    gt[0, 3] = [0.5, 0.5, 1, 1]
    pred = np.zeros_like(gt)
    pred[0, 0] = [0, 0, 0.501, 1]  # IoU 0.501: a hit
    pred[0, 1] = [0, 0, 0.499, 1]  # IoU 0.499: a miss
    pred[0, 2] = [0, 0, 0.5, 1]  # IoU exactly 0.5: a hit (Acc@0.5 is IoU >= 0.5)
    pred[0, 3] = [0.5, 0.5, 1, 1]  # IoU 1
    batch = dict(
        image=np.zeros((2, 4, 4, 3), np.float32),
        ground_boxes=gt,
        ground_tokens=np.zeros((2, 4, 2), np.int32),
        ground_mask=np.array([[True] * 4, [True] * 4]),
        valid=np.array([True, False]),
    )
    results = run(Grounding(), FakeEncoder(pred), [batch])
    assert results["acc50"] == pytest.approx(3 / 4)
    assert results["miou"] == pytest.approx((0.501 + 0.499 + 0.5 + 1) / 4, abs=1e-6)


def test_mean_class_accuracy_over_many_classes_some_absent():
    # 1,203 class names (LVIS-sized); only classes 3, 700 and 1202 occur. The mean is over those three.
    names = [f"c {i}" for i in range(1203)]

    class Encoder(FakeEncoder):
        def encode_text(self, texts):
            return np.eye(1203, dtype=np.float32)[[int(t.split()[-1]) for t in texts]]

        def encode_regions(self, images, boxes):
            return np.eye(1203, dtype=np.float32)[np.round(boxes[..., 0] * 2000).astype(int)]

    predicted = np.array([[3, 3, 5, 700], [1202, 1202, 1202, 0]])  # what each region embeds to
    labels = np.array([[3, 3, 3, 700], [1202, 1202, 700, -1]])
    boxes = np.zeros((2, 4, 4), np.float32)
    boxes[..., 0] = predicted / 2000
    batch = dict(
        image=np.zeros((2, 4, 4, 3), np.float32),
        boxes=boxes,
        region_mask=np.ones((2, 4), bool),
        region_labels=labels,
        valid=np.ones(2, bool),
    )
    results = run(RegionClassification(names, ("{}",)), Encoder(), [batch])
    # class 3: 2 of 3 right; class 700: 1 of 2; class 1202: 2 of 2 -> mean of three classes
    assert results["macc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert results["acc"] == pytest.approx(5 / 7)


def test_a_class_tied_with_the_right_one_counts_as_a_miss():
    class Tied(FakeEncoder):
        def encode_regions(self, images, boxes):
            return np.full((*boxes.shape[:2], 3), 1 / np.sqrt(3), np.float32)  # equally close to every class

    results = run(RegionClassification(["c 0", "c 1", "c 2"], ("{}",)), Tied(), [_batch()])
    assert results == {"macc": 0.0, "acc": 0.0}
