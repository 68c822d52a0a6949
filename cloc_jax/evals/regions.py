"""Region evaluations on ground-truth boxes: classification (mAcc), region<->text retrieval, grounding,
and the crop-and-encode baseline that any CLIP can run. Batches carry `boxes`, `region_mask`,
`region_labels`, `region_tokens` and `referring_tokens` as the data pipeline makes them.
"""

import numpy as np

from cloc_jax.boxes import iou_and_giou
from cloc_jax.evals.zeroshot import any_known, class_embeddings


def mean_class_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy per class present in `labels`, averaged over those classes (COCO/LVIS region mAcc).
    Label -1 (unknown) is no class: those samples are left out."""
    return float(np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels[labels >= 0])]))


def _valid(batch) -> np.ndarray:
    """[B, M] regions that exist in rows that are not padding."""
    return batch["region_mask"] & batch["valid"][:, None]


def _known(batch) -> np.ndarray:
    """[B, M] valid regions of a known class (label -1 is scored by no class metric)."""
    return _valid(batch) & (batch["region_labels"] >= 0)


class RegionClassification:
    """Each ground-truth box of a known class -> the nearest class-name embedding; reports `macc` (and
    plain `acc`)."""

    prefix = "region"

    def __init__(self, class_names, templates=("a {}",)):
        self.class_names, self.templates = tuple(class_names), tuple(templates)

    def run(self, encoder, batches):
        classes = class_embeddings(encoder, self.class_names, self.templates)
        preds, labels = [], []
        for batch in batches:
            known = _known(batch)
            z = encoder.encode_regions(batch["image"], batch["boxes"])[known]
            preds.append((z @ classes.T).argmax(-1))
            labels.append(batch["region_labels"][known])
        preds, labels = np.concatenate(preds), np.concatenate(labels)
        if any_known(labels, "region_classification"):
            yield "macc", mean_class_accuracy(preds, labels)
            yield "acc", float(np.mean(preds == labels))


def crop_and_resize(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Bilinear crop of `box` (xyxy in [0, 1]) from image [H, W, C] to [size, size, C] (half-pixel centres)."""
    h, w = image.shape[:2]
    ys = np.clip(box[1] * h + (np.arange(size) + 0.5) / size * (box[3] - box[1]) * h - 0.5, 0, h - 1)
    xs = np.clip(box[0] * w + (np.arange(size) + 0.5) / size * (box[2] - box[0]) * w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(image.dtype)


class CropClassification(RegionClassification):
    """The CLIP-only baseline: crop each box, resize it to the input size, run the image tower -> `macc_crop`."""

    def run(self, encoder, batches):
        classes = class_embeddings(encoder, self.class_names, self.templates)
        preds, labels = [], []
        for batch in batches:
            size, known = batch["image"].shape[1], _known(batch)
            # Every (image, box) slot is cropped, padding included, so the encoder sees one static shape.
            crops = [
                crop_and_resize(image, box, size)
                for image, boxes in zip(batch["image"], batch["boxes"])
                for box in boxes
            ]
            scores = encoder.encode_image(np.stack(crops)) @ classes.T
            preds.append(scores.argmax(-1)[known.reshape(-1)])
            labels.append(batch["region_labels"][known])
        preds, labels = np.concatenate(preds), np.concatenate(labels)
        if any_known(labels, "region_crop"):
            yield "macc_crop", mean_class_accuracy(preds, labels)


def same_text(tokens: np.ndarray) -> np.ndarray:
    """[R, L] -> [R, R] bool: identical token sequences (one caption may describe many regions)."""
    _, ids = np.unique(tokens, axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    return ids[:, None] == ids[None, :]


class RegionRetrieval:
    """Region<->text Recall@K over every ground-truth region of the split (GRIT-style).

    A retrieved text counts if it is the region's caption word for word, so duplicates ("small red
    circle" in many images) are not scored as misses.
    """

    prefix = "region"

    def __init__(self, ks=(1, 10)):
        self.ks = tuple(ks)

    def run(self, encoder, batches):
        regions, texts, tokens = [], [], []
        for batch in batches:
            valid = _valid(batch)
            regions.append(encoder.encode_regions(batch["image"], batch["boxes"])[valid])
            texts.append(encoder.encode_text(batch["region_tokens"][valid]))
            tokens.append(batch["region_tokens"][valid])
        sim = np.concatenate(regions) @ np.concatenate(texts).T
        match = same_text(np.concatenate(tokens))
        for k in self.ks:
            top_t = np.argsort(-sim, axis=1)[:, :k]
            top_r = np.argsort(-sim.T, axis=1)[:, :k]
            rows = np.arange(len(sim))[:, None]
            yield f"r2t_r{k}", float(match[rows, top_t].any(1).mean())
            yield f"t2r_r{k}", float(match[rows, top_r].any(1).mean())


class Grounding:
    """Referring expression -> box through the grounding head; `acc50` = fraction with IoU >= 0.5."""

    prefix = "grounding"

    def run(self, encoder, batches):
        ious = []
        for batch in batches:
            valid = _valid(batch)
            pred = encoder.ground(batch["image"], batch["referring_tokens"])
            ious.append(iou_and_giou(pred[valid], batch["boxes"][valid])[0])
        ious = np.concatenate(ious)
        yield "acc50", float(np.mean(ious >= 0.5))
        yield "miou", float(np.mean(ious))
