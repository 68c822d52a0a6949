"""Runs an evaluator the way `evals.evaluate_source` does, with hand-made embeddings instead of a model."""

import numpy as np

from cloc_jax.evals.regions import crop_and_resize


class FakeTexts:
    """What `evals.runner.EvalRunner` gives `result()`: dense text encoding and class embeddings, here from a
    fake encoder's `encode_text` (class = normalised mean of its prompts, written out independently)."""

    def __init__(self, fake):
        self.fake = fake

    def encode(self, texts):
        return self.fake.encode_text(texts)

    def classes(self, names, templates):
        z = np.stack([np.mean([self.fake.encode_text([t.format(n)])[0] for t in templates], 0) for n in names])
        return z / np.linalg.norm(z, axis=-1, keepdims=True)


def run(evaluator, fake, batches) -> dict:
    for batch in batches:
        out = {}
        if "image" in evaluator.needs:
            out["image"] = fake.encode_image(batch["image"])
        if "regions" in evaluator.needs:
            out["regions"] = fake.encode_regions(batch["image"], batch["boxes"])
        if "ground" in evaluator.needs:
            out["ground"] = fake.ground(batch["image"], batch["ground_tokens"])
        if "crops" in evaluator.needs:
            size, (b, m) = batch["image"].shape[1], batch["boxes"].shape[:2]
            crops = [crop_and_resize(i, box, size) for i, row in zip(batch["image"], batch["boxes"]) for box in row]
            out["crops"] = fake.encode_image(np.stack(crops)).reshape(b, m, -1)
        evaluator.update(out, batch)
    return dict(evaluator.result(FakeTexts(fake)))
