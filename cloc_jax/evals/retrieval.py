"""Image<->text retrieval over every caption of every image (COCO 5k: 25,010 texts; Flickr30k 1k: 5,000)."""

import numpy as np

from cloc_jax.evals.ranking import best_ranks, recalls


def recall_at_k(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """images [N, E], texts [T, E]; text_image [T] = the image each text describes (several texts may share
    one). i2t: an image is found at K if any of its texts is in its top K; t2i: a text if its image is."""
    image_ids = np.arange(len(images))
    return {
        **recalls(best_ranks(images, texts, image_ids, text_image), ks, "i2t"),
        **recalls(best_ranks(texts, images, text_image, image_ids), ks, "t2i"),
    }


class Retrieval:
    """Batches carry `captions` [B, C, L] with `caption_mask` [B, C]: every caption of each image."""

    needs = frozenset({"image"})

    def __init__(self, ks=(1, 5, 10)):
        self.ks = tuple(ks)
        self.images, self.captions, self.counts = [], [], []

    def update(self, out: dict, batch: dict) -> None:
        valid = batch["valid"] & batch["caption_mask"].any(1)  # an image without captions is no query
        self.images.append(out["image"][valid])
        self.captions.append(batch["captions"][valid][batch["caption_mask"][valid]])
        self.counts.append(batch["caption_mask"][valid].sum(1))

    def result(self, texts):
        images = np.concatenate(self.images)
        if not len(images):  # no image with a caption: recall is undefined, so none is reported
            return
        text_image = np.repeat(np.arange(len(images)), np.concatenate(self.counts))
        yield from recall_at_k(images, texts.encode(np.concatenate(self.captions)), text_image, self.ks).items()
