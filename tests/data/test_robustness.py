"""Inputs from the wild: a dataset with 5% broken records trains to the end and says what it skipped."""

import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from cloc_jax.data import records
from cloc_jax.data.rows import DataStats, Preprocess
from cloc_jax.data.scenes import CLASS_NAMES
from cloc_jax.tokenizers import ByteTokenizer
from cloc_jax.train import train_and_evaluate
from tests.conftest import tiny_config
from tests.data import fixtures


def _non_utf8(record: dict) -> bytes:
    """The record serialized with its caption's first character replaced by a lone 0xff byte."""
    caption = record["captions"][0]
    data = records.serialize(record)
    return data.replace(caption.encode(), b"\xff" + caption[1:].encode(), 1)


def wild_records(n: int) -> tuple[list[bytes], int]:
    """n serialized records: 5% skipped (broken images, no text at all), more repaired; and how many
    must be skipped."""
    good = fixtures.scene_records(n, image_size=32)
    jpeg = fixtures.encoded(Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG")
    none = dict(boxes=np.zeros((0, 4), np.float32), region_texts=[], referring=[], region_labels=[])
    skipped = [
        dict(good[0], image=b"\x00garbage"),
        dict(good[1], image=jpeg[: len(jpeg) // 2]),
        dict(good[2], image=b""),
        dict(good[3], image=fixtures.huge_png_header()),
        dict(good[4], captions=[], **none),
    ]
    repaired = [
        dict(good[5], image=fixtures.encoded(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG")),
        dict(good[6], image=fixtures.encoded(Image.new("L", (20, 32), 100), "PNG")),
        dict(good[7], image=fixtures.encoded(Image.new("RGBA", (32, 32), (0, 0, 255, 128)), "PNG")),
        dict(good[8], image=fixtures.encoded(Image.new("RGB", (1, 1), (5, 5, 5)), "PNG")),
        dict(good[9], image=fixtures.encoded(Image.new("RGB", (20_000, 20_000), (9, 9, 9)), "JPEG")),
        dict(
            good[10],
            boxes=np.array([[np.nan, 0, 1, 1], [0.9, 0.9, 0.1, 0.1], [-5, -5, 9, 9]]),
            region_texts=["a", "b", "c"],
        ),
        dict(good[11], captions=["", "  "]),  # described by its regions instead
    ]
    out = [records.serialize(r) for r in skipped + repaired + good[13:]]
    out.append(_non_utf8(good[12]))
    return out, len(skipped)


@pytest.mark.slow
def test_five_percent_broken_records_train_to_the_end_and_are_counted(tmp_path):
    data, num_skipped = wild_records(100)
    assert num_skipped == 0.05 * len(data)
    os.makedirs(tmp_path / "shards")
    writer = ArrayRecordWriter(str(tmp_path / "shards" / "wild.array_record"), "group_size:1")
    for item in data:
        writer.write(item)
    writer.close()
    records.write_class_names(str(tmp_path / "shards"), CLASS_NAMES)
    config = tiny_config(num_steps=16, eval_every=0, **{"data.train": f"array_record:{tmp_path}/shards/*"})
    train_and_evaluate(config, str(tmp_path / "run"))  # 16 x 16 = 256 samples: every record at least twice
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    last = rows[-1]
    assert last["step"] == 16 and np.isfinite(last["loss"])
    skipped = {k: v for k, v in last.items() if k.startswith("data/skipped/")}
    assert set(skipped) == {
        "data/skipped/corrupt_image",
        "data/skipped/missing_image",
        "data/skipped/too_large",
        "data/skipped/no_text",
    }
    # 256 samples from 95 usable records: two whole epochs at least, each broken record counted each time
    # it came round (prefetching may have read into a third)
    assert skipped["data/skipped/corrupt_image"] >= 4 and sum(skipped.values()) >= 2 * num_skipped
    assert last["data/dropped/boxes"] > 0 and last["data/repaired/caption_from_regions"] > 0
    assert last["data/repaired/text"] > 0
    assert 0 <= last["data/wait_fraction"] < 1


def test_preprocess_counts_each_kind_once():
    data, _ = wild_records(30)
    stats = DataStats()
    config = tiny_config()
    prep = Preprocess(ByteTokenizer(), config.tokenizer, 32, 3, augment=config.data.augment, stats=stats)
    rng = np.random.default_rng(0)
    outputs = [prep.random_map(records.deserialize(item, i), rng) for i, item in enumerate(data)]
    assert sum(o is None for o in outputs) == 5
    # evaluation keeps the record with an image and no text (zero-shot needs only the image and its class)
    evaluation = Preprocess(ByteTokenizer(), config.tokenizer, 32, 3)
    kept = [evaluation.map(records.deserialize(item, i)) for i, item in enumerate(data)]
    assert sum(o is None for o in kept) == 4
    for o in filter(None, outputs):
        assert o["image"].shape == (32, 32, 3) and np.isfinite(o["image"]).all() and np.isfinite(o["boxes"]).all()
    counts = stats.snapshot()
    assert counts["data/skipped/corrupt_image"] == 2 and counts["data/skipped/too_large"] == 1
    assert counts["data/skipped/missing_image"] == 1 and counts["data/skipped/no_text"] == 1
    assert counts["data/dropped/boxes"] == 1  # the NaN box; the swapped and the oversized ones are repaired
    assert counts["data/repaired/caption_from_regions"] == 1 and counts["data/repaired/text"] == 1


def _record(index: int, image) -> dict:
    record = records.empty_record(index, image)
    record["captions"] = ["a red circle"]
    return record


def test_non_finite_and_out_of_range_pixels_are_skipped_and_counted():
    stats = DataStats()
    config = tiny_config()
    prep = Preprocess(ByteTokenizer(), config.tokenizer, 32, 3, stats=stats)
    good = np.full((8, 8, 3), 0.5, np.float32)
    nan, inf, huge = good.copy(), good.copy(), good * 1e6
    nan[2, 3, 1], inf[0, 0, 0] = np.nan, np.inf
    outputs = [prep.map(_record(i, image)) for i, image in enumerate([nan, inf, huge, good])]
    assert [o is None for o in outputs] == [True, True, True, False]
    assert stats.snapshot() == {"data/skipped/nonfinite_pixels": 2, "data/skipped/pixels_out_of_range": 1}
    # floats in [0, 1] are scaled by 255: 0.5 -> 128 -> 128 / 127.5 - 1
    np.testing.assert_allclose(outputs[3]["image"][0, 0], 128 / 127.5 - 1.0, atol=1e-6)


def test_the_probe_refuses_only_a_source_whose_first_records_are_all_unusable():
    from cloc_jax.data.pipeline import check_usable

    config = tiny_config()
    prep = Preprocess(ByteTokenizer(), config.tokenizer, 32, 3)
    broken = [_record(i, b"not an image") for i in range(5)]
    check_usable([*broken, _record(5, np.zeros((8, 8, 3), np.uint8))], prep, "mine")  # the 6th is usable
    with pytest.raises(ValueError, match=r"'mine': none of its first 5 records is usable \(skipped/corrupt_image: 5\)"):
        check_usable(broken, prep, "mine")
    with pytest.raises(ValueError, match="'mine' holds 0 records"):
        check_usable([], prep, "mine")
