"""Zero-shot classification: each class is the mean embedding of its prompts; predict the nearest.

Every evaluator has the same shape: `needs` names the device outputs it reads per batch, `update(out,
batch)` keeps what it needs of one batch (every host's rows), and `result(texts)` encodes its texts once
(`evals.runner.EvalRunner`) and yields (metric, value) pairs.
"""

import warnings

import numpy as np

from cloc_jax.evals.ranking import label_ranks


def any_known(labels: np.ndarray, evaluator: str) -> bool:
    """Whether any sample has a known class. Samples of label -1 (unknown) are left out of every class
    metric before this; with none left the metrics are undefined, so the evaluator reports none (and
    warns) instead of a NaN."""
    if len(labels):
        return True
    warnings.warn(f"{evaluator}: no sample has a known label (all -1), so no class metric is reported", stacklevel=2)
    return False


class ZeroShot:
    """Batches carry an integer `label` indexing `class_names` (-1, unknown, left out) -> top1, top5.

    `present_only`: only the classes that occur in the split are candidates (ImageNet-A and -R: 200 of
    ImageNet's 1,000 classes, the protocol of CLIP and open_clip)."""

    needs = frozenset({"image"})

    def __init__(self, class_names, templates=("a {}",), present_only: bool = False):
        self.class_names, self.templates, self.present_only = tuple(class_names), tuple(templates), present_only
        self.images, self.labels = [], []

    def update(self, out: dict, batch: dict) -> None:
        known = batch["valid"] & (batch["label"] >= 0)
        self.images.append(out["image"][known])
        self.labels.append(batch["label"][known])

    def result(self, texts):
        labels = np.concatenate(self.labels)
        if not any_known(labels, "zeroshot"):
            return
        classes = texts.classes(self.class_names, self.templates)
        candidates = np.unique(labels) if self.present_only else np.arange(len(self.class_names))
        scores = np.concatenate(self.images) @ classes[candidates].T
        ranks = label_ranks(scores, np.searchsorted(candidates, labels))
        yield "top1", float(np.mean(ranks < 1))
        yield "top5", float(np.mean(ranks < 5))
