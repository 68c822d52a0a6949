"""Segmentation metrics against independent references: mIoU against float64 per-class counting, the label-map
interpolation against scipy's map_coordinates, panoptic quality against the COCO panoptic API itself
(panopticapi's evaluation.py, read from its PyPI wheel), and dense outputs against the region head."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from cloc_jax.data.masks import IGNORE
from cloc_jax.evals import panoptic, segmentation
from tests.data.segmentation_fixtures import id_to_rgb


def test_miou_equals_a_float64_reference_with_ignore_pixels_and_absent_classes():
    rng = np.random.default_rng(0)
    num_classes = 7
    labels = rng.integers(0, 5, (3, 37, 41))  # classes 5 and 6 never labelled
    labels[rng.random(labels.shape) < 0.2] = IGNORE
    predicted = np.where(rng.random(labels.shape) < 0.6, np.maximum(labels, 0), rng.integers(0, 6, labels.shape))
    found = segmentation.scores(segmentation.confusion(predicted, labels, num_classes))
    valid = labels != IGNORE
    ious, recalls = [], []
    for c in range(num_classes):
        inter = float(np.sum((predicted == c) & (labels == c) & valid, dtype=np.float64))
        union = float(np.sum(((predicted == c) | (labels == c)) & valid, dtype=np.float64))
        if union:  # class 5: predicted, never labelled -> IoU 0, counted; class 6: nowhere -> not counted
            ious.append(inter / union)
        if np.sum((labels == c) & valid):
            recalls.append(inter / np.sum((labels == c) & valid))
    assert len(ious) == 6 and np.isnan(found["iou"][6]) and found["iou"][5] == 0
    assert found["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert found["macc"] == pytest.approx(np.mean(recalls), abs=1e-12)
    assert found["pacc"] == pytest.approx(np.sum((predicted == labels) & valid) / valid.sum(), abs=1e-12)


@pytest.mark.parametrize("geometry", [(0.5, 0.5, 0.0, 0.0), (40 / 30, 40 / 30, 6.0, 0.0), (0.8, 1.25, 0.0, 0.0)])
def test_class_maps_interpolate_the_grid_cosines_as_scipy_does(geometry):
    """A letterbox, a centre crop and a squash: each label-map pixel's cosines are the bilinear interpolation of the
    token grid at its centre's place in the input (scipy.ndimage.map_coordinates, edges held)."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    cosines, size, shape = rng.normal(size=(5, 5, 4)).astype(np.float32), 40, (32, 50)
    got = segmentation.predict_classes(cosines, np.array(geometry), shape, size)
    sx, sy, ox, oy = geometry
    cell = size / 5
    gy = ((np.arange(shape[0]) + 0.5) * sy - oy) / cell - 0.5
    gx = ((np.arange(shape[1]) + 0.5) * sx - ox) / cell - 0.5
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    channels = [
        ndimage.map_coordinates(cosines[..., c].astype(np.float64), [yy, xx], order=1, mode="nearest") for c in range(4)
    ]
    np.testing.assert_array_equal(got, np.argmax(np.stack(channels, -1), -1))


@pytest.fixture(scope="session")
def panopticapi(tmp_path_factory):
    """The COCO panoptic API's evaluation module from the panopticapi-lite wheel (the package pins numpy < 2, which
    JAX cannot use, so it is read from the wheel rather than installed; it needs only numpy and PIL)."""
    folder = tmp_path_factory.mktemp("panopticapi")
    cmd = [sys.executable, "-m", "pip", "download", "panopticapi-lite==0.2.0", "--no-deps", "-q", "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wheels = [f for f in os.listdir(folder) if f.endswith(".whl")]
    assert wheels, f"could not download panopticapi-lite: {result.stderr[-500:]}"
    with zipfile.ZipFile(folder / wheels[0]) as wheel:
        wheel.extractall(folder / "lib")
    sys.path.insert(0, str(folder / "lib"))
    try:
        from panopticapi import evaluation
    finally:
        sys.path.remove(str(folder / "lib"))
    return evaluation


def _write(folder, name: str, ids: np.ndarray) -> None:
    Image.fromarray(id_to_rgb(ids)).save(os.path.join(folder, name))


def _panoptic_fixture(root) -> tuple[str, str, str, str]:
    """Two images: matched, missed, crowd and void segments of things and stuff (each case below)."""
    categories = [
        dict(id=1, name="person", isthing=1),
        dict(id=3, name="car", isthing=1),
        dict(id=21, name="road", isthing=0),
        dict(id=27, name="sky", isthing=0),
    ]
    gt_dir, pred_dir = root / "gt", root / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt_ann, pred_ann = [], []
    # image 1: 40 x 60
    gt = np.zeros((40, 60), np.int64)  # void everywhere not set
    gt[20:40, :] = 5  # road
    gt[2:18, 2:14] = 11  # person A (matched well)
    gt[2:12, 20:30] = 12  # person B (predicted badly: IoU < 0.5)
    gt[2:18, 40:58] = 13  # crowd of cars
    pred = np.zeros((40, 60), np.int64)
    pred[18:40, :] = 50  # road, spilling onto void rows 18-19
    pred[3:18, 2:14] = 51  # person A
    pred[2:12, 27:37] = 52  # person B shifted: IoU 3/17
    pred[4:16, 42:56] = 53  # car inside the crowd of cars: not a false positive
    pred[0:2, 0:30] = 54  # a car on void: not a false positive
    _write(gt_dir, "1.png", gt)
    _write(pred_dir, "1.png", pred)
    gt_maps = [gt]
    gt_ann.append(
        dict(image_id=1, file_name="1.png", segments_info=[
            dict(id=5, category_id=21, iscrowd=0), dict(id=11, category_id=1, iscrowd=0),
            dict(id=12, category_id=1, iscrowd=0), dict(id=13, category_id=3, iscrowd=1),
        ])
    )  # fmt: skip
    pred_ann.append(
        dict(image_id=1, file_name="1.png", segments_info=[
            dict(id=50, category_id=21), dict(id=51, category_id=1), dict(id=52, category_id=1),
            dict(id=53, category_id=3), dict(id=54, category_id=3),
        ])
    )  # fmt: skip
    # image 2: 30 x 30, a person and sky predicted where there is road
    gt = np.full((30, 30), 6, np.int64)
    gt[5:15, 5:15] = 7
    pred = np.full((30, 30), 60, np.int64)
    pred[5:15, 5:16] = 61
    _write(gt_dir, "2.png", gt)
    _write(pred_dir, "2.png", pred)
    gt_maps.append(gt)
    gt_ann.append(dict(image_id=2, file_name="2.png", segments_info=[
        dict(id=6, category_id=21, iscrowd=0), dict(id=7, category_id=1, iscrowd=0)]))  # fmt: skip
    pred_ann.append(dict(image_id=2, file_name="2.png", segments_info=[
        dict(id=60, category_id=27), dict(id=61, category_id=1)]))  # fmt: skip
    for annotation, ids in zip(gt_ann, gt_maps):
        found = dict(zip(*np.unique(ids, return_counts=True)))
        for segment in annotation["segments_info"]:  # COCO's files state each segment's area
            segment["area"] = int(found[segment["id"]])
    images = [dict(id=1, file_name="1.jpg", width=60, height=40), dict(id=2, file_name="2.jpg", width=30, height=30)]
    gt_json, pred_json = root / "gt.json", root / "pred.json"
    gt_json.write_text(json.dumps(dict(images=images, annotations=gt_ann, categories=categories)))
    pred_json.write_text(json.dumps(dict(annotations=pred_ann)))
    return str(gt_json), str(gt_dir), str(pred_json), str(pred_dir)


def test_panoptic_quality_equals_the_coco_panoptic_api(panopticapi, tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = _panoptic_fixture(tmp_path)
    ours = panoptic.evaluate_files(gt_json, gt_dir, pred_json, pred_dir)
    with open(gt_json) as f:
        gt = json.load(f)
    with open(pred_json) as f:
        pred = {a["image_id"]: a for a in json.load(f)["annotations"]}
    categories = {c["id"]: c for c in gt["categories"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    stat = panopticapi.pq_compute_single_core(0, pairs, gt_dir, pred_dir, categories)
    for name, isthing in (("all", None), ("things", True), ("stuff", False)):
        reference, _ = stat.pq_average(categories, isthing=isthing)
        for key in ("pq", "sq", "rq", "n"):
            assert ours[name][key] == pytest.approx(reference[key], abs=1e-6), (name, key)
    # by hand: person 2 TP (A at IoU 180/192, image 2's at 100/110), B missed (FN), and B's shifted prediction lies
    # 70% on void (no FP); road 1 TP (its spill onto void is not held against it: IoU 1) and image 2's road missed;
    # sky 1 FP; cars: the prediction inside the crowd of cars and the one on void are no false positives, so car is
    # not counted (n = 3)
    assert ours["all"]["n"] == 3 and ours["things"]["n"] == 1
    assert ours["things"]["pq"] == pytest.approx((180 / 192 + 100 / 110) / (2 + 0.5))
    assert ours["stuff"]["pq"] == pytest.approx((1.0 / (1 + 0.5)) / 2)


def test_predicted_segments_the_map_does_not_list_are_one_line():
    ids = np.array([[0, 3], [4, 4]])
    with pytest.raises(ValueError, match=r"segment ids \[3\]"):
        panoptic.image_stats(ids, {4: dict(category_id=1)}, ids, {4: dict(category_id=1)})
