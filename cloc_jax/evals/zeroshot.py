"""Zero-shot classification: each class is the mean embedding of its prompts; predict the nearest."""

import warnings

import numpy as np


def class_embeddings(encoder, class_names, templates) -> np.ndarray:
    """[C, E] unit vectors, each class the normalised mean of its prompts over templates."""
    prompts = [t.format(name) for name in class_names for t in templates]
    z = encoder.encode_text(prompts).reshape(len(class_names), len(templates), -1).mean(1)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def any_known(labels: np.ndarray, evaluator: str) -> bool:
    """Whether any sample has a known class. Samples of label -1 (unknown) are left out of every class
    metric before this; with none left the metrics are undefined, so the evaluator reports none (and
    warns) instead of a NaN."""
    if len(labels):
        return True
    warnings.warn(f"{evaluator}: no sample has a known label (all -1), so no class metric is reported", stacklevel=2)
    return False


class ZeroShot:
    """Batches carry `image` and an integer `label` indexing `class_names`, -1 (unknown) left out."""

    prefix = "zeroshot"

    def __init__(self, class_names, templates=("a {}",)):
        self.class_names, self.templates = tuple(class_names), tuple(templates)

    def run(self, encoder, batches):
        classes = class_embeddings(encoder, self.class_names, self.templates)
        ranked, labels = [], []
        for batch in batches:
            known = batch["valid"] & (batch["label"] >= 0)
            scores = encoder.encode_image(batch["image"])[known] @ classes.T
            ranked.append(np.argsort(-scores, axis=1)[:, :5])
            labels.append(batch["label"][known])
        ranked, labels = np.concatenate(ranked), np.concatenate(labels)
        if any_known(labels, "zeroshot"):
            yield "top1", float(np.mean(ranked[:, 0] == labels))
            yield "top5", float(np.mean((ranked == labels[:, None]).any(1)))
