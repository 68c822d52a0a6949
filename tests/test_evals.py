import numpy as np
import pytest

from cloc_jax.evals.ranking import best_ranks, label_ranks
from cloc_jax.evals.retrieval import Retrieval, recall_at_k
from cloc_jax.evals.zeroshot import ZeroShot
from tests.fake_eval import run


def test_recall_by_hand():
    # 3 images, 4 texts (image 0 owns texts 0 and 3).
    sim = np.array(
        [
            [0.1, 0.95, 0.0, 0.8],  # image 0: best text 1 (wrong), 2nd text 3 (right)
            [0.0, 0.9, 0.1, 0.0],  # image 1: best text 1 (right)
            [0.5, 0.0, 0.2, 0.0],  # image 2: texts 0, 2 -> right at rank 2
        ]
    )
    # sim = images @ texts.T with images the identity: the texts' embeddings are sim's columns
    r = recall_at_k(np.eye(3), sim.T, np.array([0, 1, 2, 0]), ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r2"] == 1.0
    # texts: 0 -> image 2 best (wrong; image 0 second), 1 -> image 0 (wrong; image 1 second),
    # 2 -> image 2 (right), 3 -> image 0 (right)
    assert r["t2i_r1"] == pytest.approx(2 / 4) and r["t2i_r2"] == 1.0


def test_recall_with_five_captions_per_image_and_texts_that_tie():
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    # texts 0-4 describe image 0, text 5 image 1
    texts = np.array([[0.25, 0.75], [0.75, 0.25], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    r = recall_at_k(images, texts, np.array([0, 0, 0, 0, 0, 1]), ks=(1, 2, 5, 10))
    # image 0: its best text (3, score 1) ties with text 5 (another image's): rank 1 -> found at K=2, not 1.
    # image 1: its only text scores 0, and all five of image 0's score >= 0: rank 5 -> found at K=10 only.
    assert [r[f"i2t_r{k}"] for k in (1, 2, 5, 10)] == [0.0, 0.5, 0.5, 1.0]
    # texts -> image: 0 wrong first (.75 > .25), 1 right, 2 wrong, 3 right, 4 tied (.5 = .5): a miss, 5 wrong
    assert r["t2i_r1"] == pytest.approx(2 / 6) and r["t2i_r2"] == 1.0


def test_ranks_match_a_float64_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    queries, keys = rng.normal(size=(1500, 8)), rng.normal(size=(300, 8))  # more queries than one chunk
    query_group, key_group = rng.integers(0, 200, 1500), rng.integers(0, 200, 300)
    ranks = best_ranks(queries.astype(np.float32), keys.astype(np.float32), query_group, key_group)
    for q in rng.choice(1500, 50, replace=False):
        sim = keys @ queries[q]
        right = key_group == query_group[q]
        expected = len(keys) if not right.any() else int(np.sum(sim[~right] >= sim[right].max()))
        assert ranks[q] == expected
    scores, labels = rng.normal(size=(20, 7)), rng.integers(0, 7, 20)
    expected = [sorted(-scores[i]).index(-scores[i, labels[i]]) for i in range(20)]
    np.testing.assert_array_equal(label_ranks(scores, labels), expected)


class FakeEncoder:
    """Images embed to themselves; a text's embedding is chosen by the test (token rows: row `tokens[0]`
    of `table`)."""

    def __init__(self, text_vectors=None, table=None):
        self.text_vectors, self.table = text_vectors or {}, table

    def encode_image(self, images):
        return images.reshape(len(images), -1)

    def encode_text(self, texts):
        if isinstance(texts, np.ndarray):
            return self.table[texts[:, 0]]
        return np.stack([self.text_vectors[t] for t in texts])


def test_retrieval_evaluator_uses_every_caption_and_skips_padding_rows():
    eye = np.eye(4, dtype=np.float32)
    # image i's captions are token rows whose first token picks row of `eye`: image 0 has captions 0 and
    # 3 (3 scores 0 against image 0 but image 0 is found by caption 0); image 2 has caption 3 only.
    captions = np.zeros((4, 3, 2), np.int32)
    captions[0, :2, 0], captions[1, 0, 0], captions[2, 0, 0], captions[3, 0, 0] = [0, 3], 1, 3, 2
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], bool)
    batch = dict(image=eye, captions=captions, caption_mask=mask, valid=np.array([True, True, True, False]))
    results = run(Retrieval(ks=(1,)), FakeEncoder(table=eye), [batch])
    # texts: [e0, e3] of image 0, [e1] of image 1, [e3] of image 2. Image 2 scores 0 against every text;
    # its own (e3) ties with image 0's e0 and e3 -> a miss. Texts e3 (image 0 and image 2) score 0
    # everywhere: both miss (ties against).
    assert results["i2t_r1"] == pytest.approx(2 / 3)
    assert results["t2i_r1"] == pytest.approx(2 / 4)


def test_retrieval_on_images_without_captions_reports_nothing():
    batch = dict(
        image=np.eye(2, dtype=np.float32),
        captions=np.zeros((2, 3, 2), np.int32),
        caption_mask=np.zeros((2, 3), bool),
        valid=np.ones(2, bool),
    )
    assert run(Retrieval(), FakeEncoder(table=np.zeros((1, 2), np.float32)), [batch]) == {}


def test_zeroshot_evaluator_by_hand():
    names = ["red circle", "blue square", "green star"]
    vectors = {f"a {n}": np.eye(3, dtype=np.float32)[i] for i, n in enumerate(names)}
    vectors.update({f"the {n}": np.eye(3, dtype=np.float32)[i] for i, n in enumerate(names)})
    images = np.array([[1, 0, 0], [0, 0.2, 1], [0, 1, 0.9], [1, 0, 0]], np.float32)
    batch = dict(image=images, label=np.array([0, 2, 2, 1]), valid=np.array([True, True, True, False]))
    results = run(ZeroShot(names, ("a {}", "the {}")), FakeEncoder(vectors), [batch])
    assert results["top1"] == pytest.approx(2 / 3)
    assert results["top5"] == 1.0


def _seven_classes():
    names = [f"c{i}" for i in range(7)]
    return names, {f"a {n}": np.eye(7, dtype=np.float32)[i] for i, n in enumerate(names)}


def test_zeroshot_leaves_unknown_labels_out_of_every_metric():
    names, vectors = _seven_classes()
    # Scores equal the image vector. Known rows: 0 right at rank 1; 2 (label 2) right at rank 2; 4 (label 5)
    # ranked last of 7 -> top1 = 1/3, top5 = 2/3. Rows 1 and 3 are unknown (-1), row 5 is padding.
    images = np.zeros((6, 7), np.float32)
    images[0, 0] = 1
    images[1, 3] = 1
    images[2, [1, 2]] = [1, 0.5]
    images[3, 6] = 1
    images[4] = [7, 6, 5, 4, 3, 0, 1]
    images[5, 6] = 1
    labels, valid = np.array([0, -1, 2, -1, 5, 6]), np.array([True] * 5 + [False])
    batches = [dict(image=images[s], label=labels[s], valid=valid[s]) for s in (slice(0, 3), slice(3, 6))]
    results = run(ZeroShot(names), FakeEncoder(vectors), batches)
    assert results == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})
    known = np.array([0, 2, 4])
    without = dict(image=images[known], label=labels[known], valid=np.ones(3, bool))
    assert run(ZeroShot(names), FakeEncoder(vectors), [without]) == pytest.approx(results)


def test_zeroshot_among_present_classes_only():
    names, vectors = _seven_classes()
    # Labels 1 and 3 occur. Image 0 (label 1) scores class 6 highest, then class 1: wrong among all seven
    # classes, right among the present {1, 3}. Image 1 (label 3) scores 3 highest: right either way.
    images = np.zeros((2, 7), np.float32)
    images[0, [6, 1, 3]] = [1, 0.8, 0.1]
    images[1, 3] = 1
    batch = dict(image=images, label=np.array([1, 3]), valid=np.ones(2, bool))
    assert run(ZeroShot(names), FakeEncoder(vectors), [batch])["top1"] == 0.5
    assert run(ZeroShot(names, present_only=True), FakeEncoder(vectors), [batch])["top1"] == 1.0


def test_zeroshot_ties_count_against_the_model():
    names, vectors = _seven_classes()
    images = np.zeros((1, 7), np.float32)
    images[0, [2, 4]] = 1  # labels 2 and 4 score alike
    batch = dict(image=images, label=np.array([2]), valid=np.ones(1, bool))
    assert run(ZeroShot(names), FakeEncoder(vectors), [batch]) == {"top1": 0.0, "top5": 1.0}


def test_zeroshot_with_no_known_label_reports_no_metric():
    names, vectors = _seven_classes()
    batch = dict(image=np.eye(7, dtype=np.float32)[:3], label=np.full(3, -1), valid=np.ones(3, bool))
    with pytest.warns(UserWarning, match="no sample has a known label"):
        assert run(ZeroShot(names), FakeEncoder(vectors), [batch]) == {}


def test_shipped_imagenet_names_and_templates_are_openais():
    """The data file against open_clip's copy of OpenAI's lists (the test extra installs open_clip)."""
    from open_clip import zero_shot_metadata as reference

    from cloc_jax.evals import benchmarks

    assert benchmarks.class_names("imagenet", ()) == tuple(reference.IMAGENET_CLASSNAMES)
    assert benchmarks.imagenet_templates("openai") == tuple(t("{}") for t in reference.OPENAI_IMAGENET_TEMPLATES)
    assert benchmarks.imagenet_templates("simple") == tuple(t("{}") for t in reference.SIMPLE_IMAGENET_TEMPLATES)
    assert len(benchmarks.imagenet_templates()) == 80 and len(benchmarks.imagenet_templates("simple")) == 7
