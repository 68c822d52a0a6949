import numpy as np
import pytest

from cloc_jax.evals.retrieval import Retrieval, recall_at_k
from cloc_jax.evals.zeroshot import ZeroShot


def test_recall_by_hand():
    # 3 images, 4 texts (image 0 owns texts 0 and 3).
    sim = np.array(
        [
            [0.1, 0.95, 0.0, 0.8],  # image 0: best text 1 (wrong), 2nd text 3 (right)
            [0.0, 0.9, 0.1, 0.0],  # image 1: best text 1 (right)
            [0.5, 0.0, 0.2, 0.0],  # image 2: texts 0, 2 -> right at rank 2
        ]
    )
    text_image = np.array([0, 1, 2, 0])
    r = recall_at_k(sim, text_image, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r2"] == 1.0
    # texts: 0 -> image 2 best (wrong; image 0 second), 1 -> image 0 (wrong; image 1 second),
    # 2 -> image 2 (right), 3 -> image 0 (right)
    assert r["t2i_r1"] == pytest.approx(2 / 4) and r["t2i_r2"] == 1.0


class FakeEncoder:
    """Images and texts embed to one-hot vectors chosen by the test."""

    def __init__(self, text_vectors):
        self.text_vectors = text_vectors

    def encode_image(self, images):
        return images.reshape(len(images), -1)

    def encode_text(self, texts):
        if isinstance(texts, np.ndarray):
            return texts.astype(np.float32)
        return np.stack([self.text_vectors[t] for t in texts])


def test_retrieval_evaluator_skips_padding_rows():
    eye = np.eye(4, dtype=np.float32)
    batch = dict(image=eye, tokens=eye[[0, 1, 3, 2]], valid=np.array([True, True, True, False]))
    results = dict(Retrieval(ks=(1,)).run(FakeEncoder({}), [batch]))
    # Valid: image0-text0 right, image1-text1 right, image2 paired with text "3" (not among valid texts' best)
    assert results["i2t_r1"] == pytest.approx(2 / 3)


def test_zeroshot_evaluator_by_hand():
    names = ["red circle", "blue square", "green star"]
    vectors = {f"a {n}": np.eye(3, dtype=np.float32)[i] for i, n in enumerate(names)}
    vectors.update({f"the {n}": np.eye(3, dtype=np.float32)[i] for i, n in enumerate(names)})
    images = np.array([[1, 0, 0], [0, 0.2, 1], [0, 1, 0.9], [1, 0, 0]], np.float32)
    batch = dict(image=images, label=np.array([0, 2, 2, 1]), valid=np.array([True, True, True, False]))
    results = dict(ZeroShot(names, ("a {}", "the {}")).run(FakeEncoder(vectors), [batch]))
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
    results = dict(ZeroShot(names).run(FakeEncoder(vectors), batches))
    assert results == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})
    known = np.array([0, 2, 4])
    without = dict(image=images[known], label=labels[known], valid=np.ones(3, bool))
    assert dict(ZeroShot(names).run(FakeEncoder(vectors), [without])) == pytest.approx(results)


def test_zeroshot_with_no_known_label_reports_no_metric():
    names, vectors = _seven_classes()
    batch = dict(image=np.eye(7, dtype=np.float32)[:3], label=np.full(3, -1), valid=np.ones(3, bool))
    with pytest.warns(UserWarning, match="no sample has a known label"):
        assert dict(ZeroShot(names).run(FakeEncoder(vectors), [batch])) == {}
