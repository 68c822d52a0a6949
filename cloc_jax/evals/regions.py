"""Region evaluations on ground-truth boxes: classification (mAcc), region<->text retrieval, grounding,
and the crop-and-encode baseline that any CLIP can run. Batches carry `boxes`, `region_mask`,
`region_labels`, `region_tokens`, and for grounding every (box, expression) pair as `ground_boxes`,
`ground_tokens`, `ground_mask`, as `data.pipeline.eval_batches` makes them.
"""

import numpy as np

from cloc_jax.boxes import iou_and_giou
from cloc_jax.evals.ranking import best_ranks, label_ranks, mean_class_accuracy, recalls
from cloc_jax.evals.zeroshot import any_known


def _valid(batch) -> np.ndarray:
    """[B, M] regions that exist in rows that are not padding."""
    return batch["region_mask"] & batch["valid"][:, None]


def _known(batch) -> np.ndarray:
    """[B, M] valid regions of a known class (label -1 is scored by no class metric)."""
    return _valid(batch) & (batch["region_labels"] >= 0)


class RegionClassification:
    """Each ground-truth box of a known class -> the nearest class-prompt embedding (CLOC's COCO/LVIS
    protocol); reports `macc` (mean over the classes present) and plain `acc`."""

    needs = frozenset({"regions"})
    output, metric = "regions", "macc"

    def __init__(self, class_names, templates=("a {}",)):
        self.class_names, self.templates = tuple(class_names), tuple(templates)
        self.embeddings, self.labels = [], []

    def update(self, out: dict, batch: dict) -> None:
        known = _known(batch)
        self.embeddings.append(out[self.output][known])
        self.labels.append(batch["region_labels"][known])

    def result(self, texts):
        labels = np.concatenate(self.labels)
        if not any_known(labels, self.metric):
            return
        scores = np.concatenate(self.embeddings) @ texts.classes(self.class_names, self.templates).T
        correct = label_ranks(scores, labels) == 0
        yield self.metric, mean_class_accuracy(correct, labels)
        if self.output == "regions":
            yield "acc", float(np.mean(correct))


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

    needs = frozenset({"crops"})
    output, metric = "crops", "macc_crop"


def same_text(tokens: np.ndarray) -> np.ndarray:
    """[R, L] -> [R] ids, equal for identical token sequences (one caption may describe many regions)."""
    return np.unique(tokens, axis=0, return_inverse=True)[1].reshape(-1)


class RegionRetrieval:
    """Region<->text Recall@K over every ground-truth region of the split (GRIT-style).

    A retrieved text counts if it is the region's caption word for word, so duplicates ("small red
    circle" in many images) are not scored as misses.
    """

    needs = frozenset({"regions"})

    def __init__(self, ks=(1, 10)):
        self.ks = tuple(ks)
        self.regions, self.tokens = [], []

    def update(self, out: dict, batch: dict) -> None:
        valid = _valid(batch)
        self.regions.append(out["regions"][valid])
        self.tokens.append(batch["region_tokens"][valid])

    def result(self, texts):
        tokens = np.concatenate(self.tokens)
        if not len(tokens):  # no region: recall is undefined, so none is reported
            return
        regions, text_embeddings, ids = np.concatenate(self.regions), texts.encode(tokens), same_text(tokens)
        yield from recalls(best_ranks(regions, text_embeddings, ids, ids), self.ks, "r2t").items()
        yield from recalls(best_ranks(text_embeddings, regions, ids, ids), self.ks, "t2r").items()


class Grounding:
    """Every referring expression -> a box through the grounding head (RefCOCO/+/g protocol: one sample per
    expression); `acc50` = fraction with IoU >= 0.5 to its box, `miou` the mean IoU."""

    needs = frozenset({"ground"})

    def __init__(self):
        self.ious = []

    def update(self, out: dict, batch: dict) -> None:
        valid = batch["ground_mask"] & batch["valid"][:, None]
        self.ious.append(iou_and_giou(out["ground"][valid], batch["ground_boxes"][valid])[0])

    def result(self, texts):
        del texts
        ious = np.concatenate(self.ious)
        if len(ious):
            yield "acc50", float(np.mean(ious >= 0.5))
            yield "miou", float(np.mean(ious))
