"""Semantic segmentation from dense outputs, scored as ADE20K / Pascal Context / VOC / COCO-Stuff are: mIoU.

Each token's dense embedding (`models.heads.RegionHead.dense`) is compared with every class's prompt-ensemble
embedding; the cosines are interpolated bilinearly from the token grid to every pixel of the image's own label map
(through the row's geometry: the letterbox or squash the model saw), and each pixel takes its nearest class
(MaskCLIP's training-free reading of a CLIP). Pixels labelled IGNORE are not scored. The confusion matrix is summed
over hosts; mIoU averages the IoU of every class present in the labels or the predictions (detectron2's and
mmsegmentation's rule), pixel accuracy is over labelled pixels, mAcc averages the recall of classes present.
"""

import numpy as np

from cloc_jax.data.masks import IGNORE

ROWS_PER_CHUNK = 64  # label-map rows interpolated at once: [64, W, C] floats (ADE-847 at 683 px: 150 MB)


def confusion(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class maps [...] -> int64 [C, C] pixel counts (row: label, column: prediction) over labelled pixels."""
    scored = labels != IGNORE
    pairs = labels[scored].astype(np.int64) * num_classes + predicted[scored]
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray) -> dict:
    """A confusion matrix -> {"miou", "pacc", "macc", "iou": [C] (NaN for classes in neither labels nor
    predictions)}."""
    matrix = matrix.astype(np.float64)
    hits, labelled, predicted = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    union = labelled + predicted - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, hits / union, np.nan)
        recall = np.where(labelled > 0, hits / labelled, np.nan)
    return dict(miou=np.nanmean(iou), pacc=hits.sum() / max(labelled.sum(), 1), macc=np.nanmean(recall), iou=iou)


def _linear(count: int, grid: int, cell: float, scale: float, offset: float) -> tuple:
    """Where the centres of `count` image pixels fall on a grid of `grid` cells (each `cell` input pixels), the pixel
    centre p landing at (p + 0.5) * scale - offset in the input -> (lower cell [count], upper cell [count], weight of
    the upper one [count, 1]): linear interpolation, edges clamped."""
    position = np.clip(((np.arange(count) + 0.5) * scale - offset) / cell - 0.5, 0, grid - 1)
    low = np.floor(position).astype(np.int64)
    return low, np.minimum(low + 1, grid - 1), (position - low).astype(np.float32)[:, None]


def predict_classes(cosines: np.ndarray, geometry: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """cosines [h, w, C] on the token grid of an S x S input; geometry [4] (`preprocess.Geometry.as_array`) ->
    the class of every pixel of an [H, W] image (int64), from the bilinearly interpolated cosines (rows first, then
    each chunk of rows along x: two cells per pixel, never an [H, W, C] array at once)."""
    (h, w, _), (height, width) = cosines.shape, shape
    scale_x, scale_y, offset_x, offset_y = geometry
    top, bottom, down = _linear(height, h, size / h, scale_y, offset_y)
    left, right, across = _linear(width, w, size / w, scale_x, offset_x)
    cosines = cosines.astype(np.float32)
    by_row = cosines[top] * (1 - down[:, :, None]) + cosines[bottom] * down[:, :, None]  # [H, w, C]
    out = np.empty((height, width), np.int64)
    for start in range(0, height, ROWS_PER_CHUNK):
        chunk = by_row[start : start + ROWS_PER_CHUNK]
        out[start : start + ROWS_PER_CHUNK] = (chunk[:, left] * (1 - across) + chunk[:, right] * across).argmax(-1)
    return out


class SemanticSegmentation:
    """mIoU, pixel accuracy, mAcc and per-class IoU (`iou/<class>`) of the training-free dense segmentation.
    Reads this host's rows (`local`): `dense` [B, h, w, E] and the batch's `label_map` / `geometry` / `valid`."""

    needs = frozenset({"dense"})
    local = True

    def __init__(self, class_names, templates=("a {}",)):
        self.class_names, self.templates = tuple(class_names), tuple(templates)
        self.matrix = np.zeros((len(self.class_names),) * 2, np.int64)

    def update(self, out: dict, batch: dict, runner) -> None:
        """This host's rows: each image's confusion against its own label map (every host asks for the class
        prompts at every batch, whatever its rows hold: encoding them is a collective)."""
        classes = runner.classes(self.class_names, self.templates)
        rows = zip(out["dense"], batch["label_map"], batch["geometry"], batch["valid"])
        for dense, labels, geometry, valid in rows:
            if valid and labels is not None:
                predicted = predict_classes(dense @ classes.T, geometry, labels.shape, batch["image"].shape[1])
                self.matrix += confusion(predicted, labels, len(self.class_names))

    def result(self, runner):
        matrix = runner.sum_over_hosts(self.matrix)
        if not matrix.sum():
            return
        found = scores(matrix)
        yield from ((k, float(found[k])) for k in ("miou", "pacc", "macc"))
        for name, iou in zip(self.class_names, found["iou"]):
            if not np.isnan(iou):
                yield f"iou/{name.strip()}", float(iou)
