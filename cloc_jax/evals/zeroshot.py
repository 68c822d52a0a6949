"""Zero-shot classification: each class is the mean embedding of its prompts; predict the nearest."""

import numpy as np


def class_embeddings(encoder, class_names, templates) -> np.ndarray:
    """[C, E] unit vectors, each class the normalised mean of its prompts over templates."""
    prompts = [t.format(name) for name in class_names for t in templates]
    z = encoder.encode_text(prompts).reshape(len(class_names), len(templates), -1).mean(1)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


class ZeroShot:
    """Batches carry `image` and an integer `label` indexing `class_names`."""

    prefix = "zeroshot"

    def __init__(self, class_names, templates=("a {}",)):
        self.class_names, self.templates = tuple(class_names), tuple(templates)

    def run(self, encoder, batches):
        classes = class_embeddings(encoder, self.class_names, self.templates)
        correct, top5 = [], []
        for batch in batches:
            valid = batch["valid"]
            scores = encoder.encode_image(batch["image"])[valid] @ classes.T
            labels = batch["label"][valid]
            ranked = np.argsort(-scores, axis=1)
            correct.append(ranked[:, 0] == labels)
            top5.append((ranked[:, :5] == labels[:, None]).any(1))
        yield "top1", float(np.concatenate(correct).mean())
        yield "top5", float(np.concatenate(top5).mean())
