"""Pseudo-labelling: phrases, NMS, the stability filter, the detectors and the Beam pipeline."""

import json
import os

import numpy as np
import pytest

from cloc_jax.annotate import beam, detectors, label, phrases
from cloc_jax.annotate.detectors import Detection
from cloc_jax.boxes import iou_and_giou
from cloc_jax.data import preprocess, records
from cloc_jax.data.scenes import CLASS_NAMES, COLOURS
from tests.data import fixtures


class ColourOracle:
    """A detector for the embedded scenes: a query names a colour; its box is the bounding box of
    that colour's pixels (score 0.9), plus a low-scoring decoy box per query."""

    def detect(self, images, queries):
        out = []
        for image, phrases_ in zip(images, queries):
            found = []
            for q, phrase in enumerate(phrases_):
                colour = next((c for c in COLOURS if c in phrase.split()), None)
                if colour is None:
                    continue
                close = np.abs(image.astype(int) - np.array(COLOURS[colour]) * 0.93).max(-1) <= 0.08 * 255
                ys, xs = np.nonzero(close)
                if len(xs):
                    h, w = close.shape
                    found.append(
                        Detection((xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h), 0.9, q)
                    )
                found.append(Detection((0.0, 0.0, 0.05, 0.05), 0.05, q))  # under any sensible threshold
            out.append(found)
        return out


def test_builtin_tagger_extracts_the_scenes_phrases_and_drops_generic_ones():
    caption = "A photo of a large red circle, a small blue square and a large green cross in the background."
    assert phrases.extract_phrases(caption, phrases.builtin_tagger) == [
        "large red circle",
        "small blue square",
        "large green cross",
    ]
    many = " and ".join(f"a thing{i}" for i in range(30))
    assert len(phrases.extract_phrases(many, phrases.builtin_tagger)) == phrases.MAX_QUERIES
    assert phrases.extract_phrases("", phrases.builtin_tagger) == []


def test_the_np_grammar_chunks_tagged_words_like_nltk_would():
    """The NLTK path with a hand-tagged sentence (the perceptron tagger's data is not installed here)."""
    tags = {"the": "DT", "dog": "NN", "chases": "VBZ", "a": "DT", "red": "JJ", "ball": "NN", "near": "IN"}
    tags.update({"tall": "JJ", "oak": "NN", "trees": "NNS"})
    tagger = lambda words: [(w, tags.get(w, "NN")) for w in words]  # noqa: E731
    assert phrases.extract_phrases("The dog chases a red ball near tall oak trees", tagger) == [
        "dog",
        "red ball",
        "tall oak trees",
    ]


def test_nms_keeps_the_most_confident_of_overlapping_boxes():
    a = Detection((0.1, 0.1, 0.5, 0.5), 0.5, 0)
    b = Detection((0.12, 0.1, 0.5, 0.52), 0.8, 1)  # overlaps a: wins, so the region is named by query 1
    c = Detection((0.6, 0.6, 0.9, 0.9), 0.3, 0)
    assert label.nms([a, b, c], 0.5) == [b, c]


def test_stability_keeps_boxes_that_come_back_under_jitter_and_drops_random_ones():
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:30, 20:50] = COLOURS["red"]
    truth = Detection((20 / 64, 10 / 64, 50 / 64, 30 / 64), 0.9, 0)
    assert label.stability(ColourOracle(), [image], [["red square"]], [[truth]], 0.05)[0][0] > 0.9

    class Random:
        rng = np.random.default_rng(0)

        def detect(self, images, queries):
            return [[Detection(tuple(np.sort(self.rng.uniform(0, 1, (2, 2)), 0).T.ravel()), 0.9, 0)] for _ in images]

    assert label.stability(Random(), [image], [["red square"]], [[truth]], 0.05)[0][0] < 0.5


def test_label_images_thresholds_and_names_regions_by_their_phrase():
    recs = fixtures.scene_records(6)
    images = [preprocess.decode(r["image"], draft=64) for r in recs]
    out = label.label_images(ColourOracle(), images, [r["captions"] for r in recs], label.LabelConfig())
    for r, regions in zip(recs, out):
        assert sorted(t for _, t, _ in regions) == sorted(r["region_texts"])  # no decoys, every object
        for box, text, _ in regions:
            truth = r["boxes"][r["region_texts"].index(text)]
            assert iou_and_giou(box, truth)[0] > 0.6  # pixel bounding boxes of small shapes


class FakeEncoder:
    """Grounds every query to the canvas box [0, 0, 1, 0.5]; region and text embeddings agree."""

    image_size = 32
    can_ground = True

    def ground(self, images, texts):
        return np.broadcast_to(np.array([0, 0, 1, 0.5], np.float32), (len(images), len(texts[0]), 4)).copy()

    def encode_regions(self, images, boxes):
        return np.ones((*boxes.shape[:2], 2)) / np.sqrt(2)

    def encode_text(self, texts):
        return np.ones((len(texts), 2)) / np.sqrt(2)


def test_cloc_grounder_maps_boxes_from_the_padded_canvas_back_to_the_image():
    wide = np.zeros((16, 32, 3), np.uint8)  # resize+pad puts it in the top half of the canvas
    found = detectors.ClocGrounder(FakeEncoder(), batch_size=4).detect([wide], [["a", "b", "c"]])
    assert [d.query for d in found[0]] == [0, 1, 2]
    for d in found[0]:
        np.testing.assert_allclose(d.box, [0, 0, 1, 1], atol=1e-6)
        assert d.score == pytest.approx(1.0)


def test_owlv2_detector_runs_a_tiny_random_model(tmp_path):
    """OWLv2 through transformers on a tiny random model with a letters-only CLIP vocabulary."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}  # OWL treats queries starting with id 0 as padding
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    Owlv2Processor(Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer).save_pretrained(tmp_path)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(layers, vocab_size=64),
        vision_config=dict(layers, image_size=64, patch_size=16),
        projection_dim=32,
    )
    torch.manual_seed(0)  # an unseeded random model sometimes saturates a score to exactly 1.0
    Owlv2ForObjectDetection(config).save_pretrained(tmp_path)

    (found,) = detectors.from_spec(f"owlv2:{tmp_path}").detect(
        [np.zeros((20, 40, 3), np.uint8)], [["red circle", "cat"]]
    )
    assert len(found) == (64 // 16) ** 2  # a box per patch, each with its best query
    for d in found:
        assert all(0 <= v <= 1 for v in d.box) and d.query in (0, 1) and 0 <= d.score <= 1


def test_beam_pipeline_labels_shards_then_skips_finished_ones(tmp_path):
    """The DirectRunner pipeline writes what labelling in-process gives, and a rerun redoes only
    missing shards."""
    recs = fixtures.scene_records(10)
    empty = dict(boxes=np.zeros((0, 4), np.float32), region_texts=[], referring=[], region_labels=[])
    stripped = [dict(r, **empty) for r in recs]
    fixtures.write_array_record(str(tmp_path / "raw"), stripped, num_shards=3)
    pattern, out = str(tmp_path / "raw" / "*.array_record"), str(tmp_path / "labelled")
    want, want_counts = label.relabel(stripped, ColourOracle(), label.LabelConfig(), CLASS_NAMES)
    assert beam.run(pattern, out, ColourOracle, batch_size=4) == dict(shards=3, **want_counts)
    assert want_counts["regions"] >= 0.9 * sum(len(r["boxes"]) for r in recs)
    labelled = records.ArrayRecordSource(os.path.join(out, "*.array_record"))
    assert len(labelled) == 10 and labelled.class_names == CLASS_NAMES
    by_caption = {r["captions"][0]: r for r in want}
    for i in range(10):
        got = labelled[i]
        expected = by_caption[got["captions"][0]]
        assert got["region_texts"] == expected["region_texts"]
        np.testing.assert_allclose(got["boxes"], expected["boxes"], atol=1e-6)
        np.testing.assert_array_equal(got["region_labels"], expected["region_labels"])
    assert beam.run(pattern, out, ColourOracle)["shards"] == 0  # a rerun has nothing to do
    os.remove(sorted(labelled.paths)[0])
    assert beam.run(pattern, out, ColourOracle)["shards"] == 1  # ... but the missing shard


def test_the_labeller_writes_spatial_referring_expressions_only_when_asked():
    recs = fixtures.scene_records(8)
    stripped = [dict(r, boxes=np.zeros((0, 4), np.float32), region_texts=[], referring=[]) for r in recs]
    plain, _ = label.relabel(stripped, ColourOracle(), label.LabelConfig(), CLASS_NAMES)
    spatial, _ = label.relabel(stripped, ColourOracle(), label.LabelConfig(referring=True), CLASS_NAMES)
    assert all(set(r["referring"]) <= {""} for r in plain)  # the papers' recipe: none
    compared = 0
    for truth, got in zip(recs, spatial):
        if len(got["boxes"]) != len(truth["boxes"]):
            continue  # the colour oracle merges two objects of one colour
        compared += 1  # every object found: the expressions are the dataset's own, named by class
        by_label = dict(zip(got["region_labels"], got["referring"]))
        assert [by_label[c] for c in truth["region_labels"]] == list(truth["referring"])
    assert compared >= 6
    # A phrase outside the vocabulary names its object itself.
    outside, _ = label.relabel(stripped[:1], ColourOracle(), label.LabelConfig(referring=True), ("hexagon",))
    assert outside[0]["referring"][0].startswith(f"the {outside[0]['region_texts'][0]}")


def test_a_phrase_names_the_longest_class_it_ends_with():
    names = ("circle", "red circle", "blue square")
    assert label.class_of("large red circle", names) == 1
    assert label.class_of("circle", names) == 0
    assert label.class_of("green cross", names) == -1
    assert label.class_of("bored circle", names) == 0  # whole words: not "red circle"
