"""Every source reads a fixture made here into the record schema, and feeds identical batches for identical seeds."""

import json

import msgpack
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cloc_jax.data import pipeline, preprocess, records, sources
from cloc_jax.data.records import deserialize, serialize
from cloc_jax.data.scenes import CLASS_NAMES
from cloc_jax.tokenizers import ByteTokenizer
from tests.conftest import tiny_config
from tests.data import fixtures

N = 12


@pytest.fixture(scope="module")
def recs():
    return fixtures.scene_records(N)


@pytest.fixture(scope="module")
def specs(recs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return dict(
        array_record=f"array_record:{fixtures.write_array_record(str(root / 'ar'), recs)}",
        coco=fixtures.write_coco(str(root / "coco"), recs),
        webdataset=fixtures.write_webdataset(str(root / "wds"), recs),
        webdataset_pixels=fixtures.write_webdataset(str(root / "wds_px"), recs, pixel_boxes=True),
    )


def by_caption(source) -> dict:
    return {source[i]["captions"][0]: source[i] for i in range(len(source))}


@pytest.mark.parametrize("kind", ["array_record", "coco", "webdataset", "webdataset_pixels"])
def test_each_file_source_reads_back_what_was_written(recs, specs, kind):
    source = sources.from_spec(specs[kind], image_size=48)
    assert len(source) == N and source.class_names == CLASS_NAMES
    got = by_caption(source)  # sources may order records differently
    for want in recs:
        record = got[want["captions"][0]]
        np.testing.assert_array_equal(
            preprocess.decode(record["image"], draft=48), preprocess.decode(want["image"], draft=48)
        )
        np.testing.assert_allclose(record["boxes"], want["boxes"], atol=1e-6)
        # COCO-format refs hold every sentence of a box
        assert record["referring"] == ([[r] for r in want["referring"]] if kind == "coco" else want["referring"])
        np.testing.assert_array_equal(record["tags"], want["tags"])
        assert record["has_tags"] is True
        if kind == "coco":  # class names as region texts, labels from categories
            np.testing.assert_array_equal(record["region_labels"], want["region_labels"])
            assert record["region_texts"] == [CLASS_NAMES[i] for i in want["region_labels"]]
        else:
            assert record["region_texts"] == want["region_texts"]


def test_serialize_round_trip_and_non_utf8_text_is_replaced(recs):
    record = deserialize(serialize(recs[3]), 3)
    for key in ("captions", "region_texts", "referring"):
        assert record[key] == recs[3][key]
    broken = serialize(dict(recs[3], captions=["caf\xe9"]))
    broken = broken.replace("caf\xe9".encode(), b"caf\xe9\xe9")  # same length, not UTF-8
    assert deserialize(broken, 3)["captions"] == ["caf\ufffd\ufffd"]
    assert deserialize(b"\xc1 not msgpack", 3)["image"] == b""  # skipped as a missing image downstream


@pytest.mark.parametrize("name,named_classes", [("ref_coco/refcoco_unc", False), ("lvis", True)])
def test_tfds_sources_through_mock_data(name, named_classes):
    """coco_captions goes through the same adapter, but its tfds builder needs TensorFlow installed."""
    with tfds.testing.mock_data(num_examples=4):
        source = sources.from_spec(f"tfds:{name}:train", image_size=32)
        assert len(source) == 4 and (len(source.class_names) > 0) == named_classes
        for i in range(4):
            record = source[i]
            n = len(record["boxes"])
            assert len(record["region_texts"]) == len(record["referring"]) == len(record["region_labels"]) == n
            if not named_classes:  # ref_coco: every expression of a box; the region is named by its first
                assert all(isinstance(r, list) for r in record["referring"])
                assert record["region_texts"] == [r[0] if r else "" for r in record["referring"]]
            assert record["image"].dtype == np.uint8 and record["image"].ndim == 3
            assert record["has_tags"] == named_classes  # ref_coco's bare category ids name no tag
        raw = source.source[0]["objects"]["bbox"][0]  # tfds: (ymin, xmin, ymax, xmax)
        np.testing.assert_array_equal(source[0]["boxes"][0], raw[[1, 0, 3, 2]])


def test_mixture_follows_its_weights_and_unifies_the_vocabularies(specs):
    class Other:  # a source with its own vocabulary: one shared name, one new
        class_names = ("blue cross", "zebra")

        def __len__(self):
            return 50

        def __getitem__(self, i):
            record = records.empty_record(i, np.zeros((4, 4, 3), np.uint8))
            return dict(record, region_labels=np.array([0, 1], np.int32), tags=np.array([1], np.int32), label=0)

    base = sources.from_spec(specs["array_record"], 48)
    mix = sources.Mixture([base, Other()], [0.75, 0.25])
    assert mix.class_names == (*CLASS_NAMES, "zebra")
    others = [mix[i] for i in range(400) if isinstance(mix[i]["image"], np.ndarray)]
    assert 80 <= len(others) <= 120  # 25% of 400
    np.testing.assert_array_equal(others[0]["region_labels"], [CLASS_NAMES.index("blue cross"), len(CLASS_NAMES)])
    assert others[0]["label"] == CLASS_NAMES.index("blue cross")
    assert sources.from_spec(f"0.75*{specs['array_record']} + 0.25*scenes", 48).class_names == CLASS_NAMES


def test_only_sources_that_annotate_tags_say_they_have_them(recs, specs, tmp_path):
    captions = sources.from_spec(fixtures.coco_captions_only(specs["coco"]), 48)
    assert len(captions) == N and not any(captions[i]["has_tags"] for i in range(N))
    untagged = sources.from_spec(fixtures.write_webdataset(str(tmp_path / "no_tags"), recs, tags=False), 48)
    assert not any(untagged[i]["has_tags"] for i in range(N))  # a sample without a `tags` key
    without_vocabulary = fixtures.write_webdataset(str(tmp_path / "no_vocabulary"), recs)
    (tmp_path / "no_vocabulary" / records.CLASS_NAMES_FILE).unlink()  # tag names index nothing
    assert not sources.from_spec(without_vocabulary, 48)[0]["has_tags"]
    assert sources.from_spec("scenes", 48)[0]["has_tags"] is True
    assert records.empty_record(0, b"")["has_tags"] is False
    mix = sources.from_spec(f"0.5*scenes + 0.5*{fixtures.coco_captions_only(specs['coco'])}", 48)
    for i in range(20):  # each record keeps its own source's flag
        assert mix[i]["has_tags"] == isinstance(mix[i]["image"], np.ndarray)  # scenes: arrays; coco: bytes


def test_shards_from_before_the_tags_flag_are_tagged_if_they_store_tags(recs):
    old = msgpack.unpackb(serialize(recs[0]))
    del old["has_tags"]
    assert deserialize(msgpack.packb(old), 0)["has_tags"] is True
    del old["tags"]
    assert deserialize(msgpack.packb(old), 0)["has_tags"] is False
    assert deserialize(serialize(dict(recs[0], has_tags=False)), 0)["has_tags"] is False


@pytest.mark.parametrize("kind", ["array_record", "coco", "webdataset", "mixture"])
def test_identical_seeds_give_identical_batches(specs, kind):
    spec = f"0.5*{specs['coco']} + 0.5*{specs['webdataset']}" if kind == "mixture" else specs[kind]
    config = tiny_config(**{"data.train": spec, "batch_size": 8})
    first, again = (next(pipeline.train_iterator(config, ByteTokenizer())) for _ in range(2))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    config.data.seed = 1
    other = next(pipeline.train_iterator(config, ByteTokenizer()))
    assert not np.array_equal(first["index"], other["index"]) or not np.array_equal(first["image"], other["image"])
    assert first["image"].shape == (8, 32, 32, 3) and first["region_mask"].any()


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nonsense:x", "unknown kind"),
        ("tfds:lvis", "expected tfds:NAME:SPLIT"),
        ("coco:a.json", "expected coco:ANN.json"),
        ("0.5*scenes + scenes", r"expected weight\*spec"),
        ("array_record:/nowhere/*.array_record", "no shards match"),
        ("webdataset:/nowhere/{0..3}.tar", "no tar shards match"),
    ],
)
def test_bad_source_specs_are_one_line_errors(spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sources.from_spec(spec, 32)


def test_a_truncated_tar_keeps_the_samples_before_the_damage(recs, tmp_path):
    spec = fixtures.write_webdataset(str(tmp_path), recs, per_shard=N)
    path = str(tmp_path / "shard-0000.tar")
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    source = sources.from_spec(spec, 48)
    assert 0 < len(source) < N


def test_lvis_style_annotations_name_images_by_their_coco_url(recs, tmp_path):
    """LVIS files carry `coco_url` instead of `file_name`; categories become the class vocabulary."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    (image_dir / "000000000042.png").write_bytes(recs[0]["image"])
    lvis = dict(
        images=[dict(id=42, coco_url="http://images.cocodataset.org/val2017/000000000042.png", width=48, height=48)],
        annotations=[dict(id=1, image_id=42, bbox=[12, 24, 12, 12], category_id=7)],
        categories=[dict(id=3, name="aerosol_can"), dict(id=7, name="zebra")],
    )
    (tmp_path / "lvis.json").write_text(json.dumps(lvis))
    source = sources.from_spec(f"coco:{tmp_path / 'lvis.json'}@{image_dir}", 48)
    assert source.class_names == ("aerosol can", "zebra")
    record = source[0]
    assert record["image"] == recs[0]["image"] and record["region_texts"] == ["zebra"]
    np.testing.assert_allclose(record["boxes"], [[0.25, 0.5, 0.5, 0.75]])
    np.testing.assert_array_equal(record["region_labels"], [1])
    assert record["has_tags"] is True


def test_karpathy_splits_hold_every_sentence_of_their_images(tmp_path, recs):
    spec = fixtures.write_karpathy(str(tmp_path), recs, test=range(0, N, 2))
    test = sources.from_spec(spec, 48)
    assert len(test) == len(range(0, N, 2)) and test.class_names == ()
    for i, want in zip(range(len(test)), recs[::2]):
        record = test[i]
        assert record["captions"] == fixtures.five_captions(want)
        np.testing.assert_array_equal(
            preprocess.decode(record["image"], draft=48), preprocess.decode(want["image"], draft=48)
        )
    assert len(sources.from_spec(spec.replace(":test@", ":train@"), 48)) == N - len(test)
    with pytest.raises(ValueError, match="karpathy split='tset'"):
        sources.from_spec(spec.replace(":test@", ":tset@"), 48)


def test_coco_region_captions_and_one_refcoco_split(tmp_path, recs):
    spec = fixtures.write_coco(str(tmp_path), recs[:4], region_captions=True, ref_splits=("testA", "testB"))
    files, _, images = spec.removeprefix("coco:").rpartition("@")
    instances, refs = files.split(",")[1], files.split(",")[2]
    whole = sources.from_spec(f"coco:{instances},{refs}@{images}", 48)
    assert whole[0]["region_texts"] == [f"region {t}" for t in recs[0]["region_texts"]]  # the box's caption
    test_a = sources.from_spec(f"coco:{instances},{refs}:testA@{images}", 48)
    # the refs alternate testA, testB box by box: each image keeps its testA boxes only
    for i in range(len(test_a)):
        record, want = test_a[i], recs[i]
        np.testing.assert_allclose(record["boxes"], want["boxes"][0::2], atol=1e-6)
        assert record["referring"] == [[r] for r in want["referring"][0::2]]


def test_a_tfds_dataset_that_is_not_prepared_is_not_downloaded_and_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tfds imagenet_a:test is not prepared under .*tfds build imagenet_a"):
        sources.TfdsSource("imagenet_a", "test", data_dir=str(tmp_path))
    assert not any(tmp_path.rglob("*.tar"))  # nothing was fetched
