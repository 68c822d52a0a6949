"""Image-text retrieval: Recall@K in both directions, for any source yielding images and captions."""

import numpy as np


def recall_at_k(sim: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """sim [N_images, N_texts]; text_image [N_texts] = index of each text's image (several texts may share one).

    i2t: an image counts as found if any of its texts is in its top K; t2i: a text if its image is.
    """
    n_images = sim.shape[0]
    out = {}
    order_i2t = np.argsort(-sim, axis=1)  # [N_images, N_texts]
    order_t2i = np.argsort(-sim.T, axis=1)  # [N_texts, N_images]
    for k in ks:
        hits_i2t = text_image[order_i2t[:, :k]] == np.arange(n_images)[:, None]
        out[f"i2t_r{k}"] = float(hits_i2t.any(axis=1).mean())
        out[f"t2i_r{k}"] = float((order_t2i[:, :k] == text_image[:, None]).any(axis=1).mean())
    return out


class Retrieval:
    """Embeds every image and caption of the batches; one caption per image (`tokens` [B, L])."""

    prefix = "retrieval"

    def __init__(self, ks=(1, 5, 10)):
        self.ks = tuple(ks)

    def run(self, encoder, batches):
        images, texts = [], []
        for batch in batches:
            valid = batch["valid"]
            images.append(encoder.encode_image(batch["image"])[valid])
            texts.append(encoder.encode_text(batch["tokens"])[valid])
        images, texts = np.concatenate(images), np.concatenate(texts)
        yield from recall_at_k(images @ texts.T, np.arange(len(texts)), self.ks).items()
