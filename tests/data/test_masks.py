"""The pixel level of the data: COCO masks equal pycocotools' own decoding, masks and label maps stay pixel-aligned
with the image through every resize and augmentation, every benchmark layout reads back its labels, records keep
their masks on disk, and bad masks are dropped and counted."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cloc_jax.data import masks, records, sources, transforms
from cloc_jax.data.masks import IGNORE
from cloc_jax.data.rows import DataStats, Preprocess
from cloc_jax.data.segmentation import LAYOUTS, class_lists
from cloc_jax.models.spec import PreprocessSpec
from cloc_jax.tokenizers import ByteTokenizer
from tests.data import segmentation_fixtures as fixtures

TOKENS = ml_collections.ConfigDict(dict(context_length=16, region_context_length=16, region_pack_length=0))


def _prep(size=48, augment=None, rule=None, stats=None, num_classes=41, **options):
    options.setdefault("masks", True)
    return Preprocess(ByteTokenizer(), TOKENS, size, 4, augment=augment, rule=rule, stats=stats or DataStats(),
                      num_classes=num_classes, **options)  # fmt: skip


def test_coco_polygon_and_rle_masks_equal_pycocotools(tmp_path):
    """Polygons (two parts), a compressed RLE and a crowd's uncompressed RLE through CocoSource and the pipeline's
    decoding equal pycocotools' COCO.annToMask on the same file."""
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO

    h, w = 30, 40
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "a.png")
    blob = np.zeros((h, w), np.uint8, order="F")
    blob[5:20, 22:35] = 1
    rle = coco_mask.encode(blob)
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros((h, w), np.uint8)
    crowd[22:28, 3:30] = 1
    flat = crowd.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))  # uncompressed RLE: run lengths from 0s
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    annotations = [
        dict(id=1, image_id=7, category_id=3, bbox=[2, 2, 15, 12], iscrowd=0,
             segmentation=[[2, 2, 16, 2, 16, 8, 2, 8], [4, 10, 10, 10, 7, 14]]),
        dict(id=2, image_id=7, category_id=3, bbox=[22, 5, 13, 15], iscrowd=0, segmentation=rle),
        dict(id=3, image_id=7, category_id=5, bbox=[3, 22, 27, 6], iscrowd=1,
             segmentation=dict(counts=counts, size=[h, w])),
    ]  # fmt: skip
    data = dict(
        images=[dict(id=7, file_name="a.png", width=w, height=h)],
        annotations=annotations,
        categories=[dict(id=3, name="cup"), dict(id=5, name="plate")],
    )
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    record = sources.from_spec(f"coco:{path}@{tmp_path}", 32)[0]
    decoded, problem = masks.decode_masks(record["masks"], 3, h, w)
    reference = COCO(str(path))
    expected = np.stack([reference.annToMask(reference.anns[i]) for i in (1, 2, 3)]).astype(bool)
    assert problem is None and decoded.sum() > 300
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(record["crowd"], [False, False, True])
    disk = records.deserialize(records.serialize(record), 0)  # RLE on disk, bit for bit
    np.testing.assert_array_equal(masks.decode_masks(disk["masks"], 3, h, w)[0], expected)


def _bars_record(h=37, w=53) -> dict:
    """An image that is white exactly where its first mask is (and grey elsewhere), a second mask, a label map."""
    first = np.zeros((h, w), bool)
    first[5:30, 8:20] = True
    first[10:14, 30:50] = True
    second = np.zeros((h, w), bool)
    second[20:35, 25:45] = True
    image = np.where(first[..., None], 255, 60).astype(np.uint8).repeat(3, -1)
    semantic = np.full((h, w), 2, np.int32)
    semantic[first], semantic[second] = 0, 1
    semantic[:, :3] = IGNORE
    boxes = np.array([[8 / w, 5 / h, 50 / w, 30 / h], [25 / w, 20 / h, 45 / w, 35 / h]], np.float32)
    return dict(records.empty_record(0, image), boxes=boxes, region_texts=["a", "b"], region_labels=np.array([0, 1]),
                masks=np.stack([first, second]), semantic=semantic, captions=["x"])  # fmt: skip


def _nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL's nearest-neighbour resize of a label map (the reference)."""
    return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((width, height), Image.NEAREST))


def test_masks_and_label_maps_follow_every_evaluation_geometry_as_pil_resizes_them():
    record, size = _bars_record(), 48
    h, w = record["semantic"].shape
    semantic = record["semantic"]
    nh, nw = round(h * size / w), size  # letterbox: long side (width) to 48
    expected = np.full((size, size), IGNORE)
    expected[:nh, :nw] = _nearest(semantic, nh, nw)
    row = _prep(size, rule=PreprocessSpec(resize="letterbox")).map(record)
    np.testing.assert_array_equal(row["semantic"], expected)
    np.testing.assert_array_equal(row["region_masks"][0], expected == 0)
    squash = _prep(size, rule=PreprocessSpec(resize="squash")).map(record)
    np.testing.assert_array_equal(squash["semantic"], _nearest(semantic, size, size))
    crop = _prep(size, rule=PreprocessSpec(resize="center_crop", crop_fraction=1.0)).map(record)
    short = _nearest(semantic, size, int(size * w / h))  # short side (height) to 48, then the centre
    left = (short.shape[1] - size) // 2
    np.testing.assert_array_equal(crop["semantic"], short[:, left : left + size])
    assert row["has_masks"] and row["has_semantic"] and not row["region_masks"][2:].any()


@pytest.mark.parametrize("resize", ["pad", "crop"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_stay_on_their_pixels_through_training_augmentation(resize, seed):
    """The image is white exactly on the first mask: after a random crop or letterbox and a flip, the warped mask is
    white in the image (the resize blends only pixels on its border)."""
    augment = ml_collections.ConfigDict(
        dict(resize=resize, crop_scale=(0.3, 1.0), min_visible=0.0, flip=0.5, flip_texts="swap")
    )
    prep = _prep(48, augment=augment)
    flips = 0
    for index in range(4):
        rng = np.random.default_rng([seed, index])
        row = prep.random_map(_bars_record(), rng)
        white = row["image"][..., 0] > 0.4  # [-1, 1]: 255 -> 1, 60 -> -0.53
        inside = row["semantic"] == 0
        border = inside ^ (
            np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1)
        )
        assert inside.sum() > 20
        assert (white == inside)[~border].mean() > 0.99
        for mask, label, present in zip(row["region_masks"], row["region_labels"], row["region_mask"]):
            np.testing.assert_array_equal(mask, (row["semantic"] == label) & present)  # each kept box keeps its mask
        flips += bool(np.any(white[:, :24] != white[:, ::-1][:, :24]))
    assert flips


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_benchmark_layout_reads_back_its_classes(tmp_path, layout):
    recs = fixtures.scenes(3)
    source = sources.from_spec(fixtures.write_semseg(str(tmp_path), layout, recs), 32)
    num_classes = len(class_lists()[LAYOUTS[layout].classes])
    assert len(source) == 3 and len(source.class_names) == num_classes
    for i, r in enumerate(recs):
        got, problem = masks.decode_semantic(source[i]["semantic"], 40, 40, num_classes)
        assert problem is None
        np.testing.assert_array_equal(got, fixtures.benchmark_labels(r["semantic"], num_classes))


def test_panoptic_files_become_masks_boxes_and_a_painted_label_map(tmp_path):
    recs = fixtures.scenes(3)
    source = sources.from_spec(fixtures.write_panoptic(str(tmp_path), recs), 40)
    row = _prep(40, rule=PreprocessSpec(resize="letterbox"), label_maps=True).map(source[1])
    np.testing.assert_array_equal(row["label_map"], recs[1]["semantic"])  # things by class, background as class 40
    n = len(recs[1]["masks"])
    np.testing.assert_array_equal(row["region_masks"][1 : n + 1], recs[1]["masks"])  # box 0 is the background
    np.testing.assert_allclose(row["geometry"], [1, 1, 0, 0])


def test_bad_masks_and_label_maps_are_dropped_and_counted(tmp_path):
    stats = DataStats()
    prep = _prep(32, stats=stats, rule=PreprocessSpec(resize="letterbox"), num_classes=3)
    good = _bars_record()
    rows = [
        prep.map(dict(good, masks=good["masks"][:, :20])),  # another size than the image
        prep.map(dict(good, semantic=np.where(good["semantic"] == 2, 7, good["semantic"]))),  # class 7 of 3
        prep.map(dict(good, semantic=b"not a png")),
    ]
    ids = np.zeros((37, 53), np.int64)
    ids[2:9, 2:9], ids[20:30, 20:30] = 4, 9  # 9: not among the segments
    png = fixtures.id_to_rgb(ids)
    buffer = os.path.join(tmp_path, "p.png")
    Image.fromarray(png).save(buffer)
    with open(buffer, "rb") as f:
        rows.append(prep.map(dict(good, masks=dict(panoptic=f.read(), ids=[4, 5]), semantic=b"")))
    empty = good["masks"].copy()
    empty[0] = False
    rows.append(prep.map(dict(good, masks=empty)))  # box 0's mask is empty: box 0 is dropped, box 1 kept
    assert all(r is not None for r in rows)  # the images are still used
    assert rows[4]["region_mask"].tolist() == [True, False, False, False] and rows[4]["region_labels"][0] == 1
    assert not rows[0]["has_masks"] and rows[0]["has_semantic"]
    assert not rows[1]["has_semantic"] and rows[1]["has_masks"] and (rows[1]["semantic"] == IGNORE).all()
    assert not rows[3]["has_masks"] and not rows[3]["has_semantic"]
    assert stats.snapshot() == {
        "data/dropped/masks_wrong_size": 1,
        "data/dropped/semantic_class_out_of_range": 1,
        "data/dropped/corrupt_semantic": 1,
        "data/dropped/panoptic_unknown_ids": 1,
        "data/dropped/empty_masks": 1,
    }


def test_records_keep_masks_and_label_maps_on_disk(tmp_path):
    recs = fixtures.scenes(2)
    encoded = [dict(r, image=transforms.encode_image(r["image"])) for r in recs]
    pattern = os.path.join(tmp_path, "*.array_record")
    records.write_shards(encoded, str(tmp_path), 1)
    source = records.ArrayRecordSource(pattern)
    for r, back in zip(recs, (source[0], source[1])):
        np.testing.assert_array_equal(masks.decode_masks(back["masks"], len(r["boxes"]), 40, 40)[0], r["masks"])
        np.testing.assert_array_equal(masks.decode_semantic(back["semantic"], 40, 40, 41)[0], r["semantic"])


def test_a_mixture_remaps_label_maps_into_its_segmentation_vocabulary(tmp_path):
    """Scenes (40 shapes + background) mixed with VOC's layout (20 classes): one vocabulary, every label map in it."""
    recs = fixtures.scenes(4)
    voc = fixtures.write_semseg(str(tmp_path), "voc", recs)
    mixture = sources.from_spec(f"0.5*scenes:heldout:4 + 0.5*{voc}", 40)
    voc_names = class_lists()["voc20"]
    assert mixture.segmentation_classes[:60] == mixture.class_names
    assert mixture.segmentation_classes[60:] == ("background",) and mixture.class_names[40:] == tuple(voc_names)
    seen = set()
    for i in range(8):
        record = mixture[i]
        classes = len(mixture.segmentation_classes)
        values, _ = masks.decode_semantic(record["semantic"], 40, 40, classes, record["semantic_remap"])
        named = {mixture.segmentation_classes[v] for v in np.unique(values) if v >= 0}
        seen.add("background" in named)
        if "background" not in named:  # a VOC record: its classes, moved past the scenes' 40
            assert named and named <= set(voc_names)
        else:
            assert named <= set(mixture.class_names[:40]) | {"background"}
    assert seen == {True, False}
