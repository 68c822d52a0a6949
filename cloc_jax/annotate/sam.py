"""SAM pseudo-masks for boxed records (UMG-CLIP's data engine, its foreground masks).

`SamMasker` (transformers' `SamModel` + `SamProcessor` from a local folder) prompts SAM with each region's box and
with the box moved along its diagonal both ways (by `mask_jitter` of its width and height); a mask is stable when
its mean IoU with the two jittered masks reaches `min_mask_stability`. One image embedding serves all of an
image's prompts. `add_masks` writes one COCO RLE per box into the records (`masks`, the form `data/masks.py`
reads): an unstable mask is written empty, so the box keeps training the box-level losses while dense training
drops it (`dropped/empty_masks`); records whose images cannot be decoded pass through unchanged and are counted.
"""

import dataclasses

import numpy as np

from cloc_jax.data import masks as pixel_masks
from cloc_jax.data import preprocess, transforms


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    mask_jitter: float = 0.05  # the box moved along its diagonal by this fraction of its width and height
    min_mask_stability: float = 0.8  # mean IoU of the jittered masks with the box's own; 0 keeps every mask


def jittered(boxes: np.ndarray, jitter: float) -> np.ndarray:
    """boxes [N, 4] xyxy in [0, 1] -> [2, N, 4]: each moved by +-jitter x its (width, height) along its diagonal."""
    step = jitter * np.tile(boxes[:, 2:] - boxes[:, :2], 2)
    return np.clip(np.stack([boxes + step, boxes - step]), 0.0, 1.0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [N, H, W] x2 -> [N] IoU (two empty masks: 0)."""
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


class SamMasker:
    """`masks(image uint8 [H, W, 3], boxes [K, 4] xyxy in [0, 1]) -> bool [K, H, W]` from SAM (single-mask output,
    as box prompts are unambiguous). Needs torch; weights are read from `model_dir`, never downloaded."""

    @classmethod
    def from_spec(cls, spec: str) -> "SamMasker":
        """'sam:MODEL_DIR' -> a masker (one-line error otherwise)."""
        kind, _, path = spec.partition(":")
        if kind != "sam" or not path:
            raise ValueError(f"masker {spec!r}: expected sam:MODEL_DIR")
        return cls(path)

    def __init__(self, model_dir: str):
        import torch
        from transformers import SamModel, SamProcessor

        self.torch = torch
        self.processor = SamProcessor.from_pretrained(model_dir)
        self.model = SamModel.from_pretrained(model_dir).eval()

    def masks(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if not len(boxes):
            return np.zeros((0, h, w), bool)
        pixels = (boxes * np.array([w, h, w, h], np.float32)).tolist()
        inputs = self.processor(images=image, input_boxes=[pixels], return_tensors="pt")
        with self.torch.no_grad():
            embeddings = self.model.get_image_embeddings(inputs["pixel_values"])
            out = self.model(image_embeddings=embeddings, input_boxes=inputs["input_boxes"], multimask_output=False)
        (masks,) = self.processor.image_processor.post_process_masks(
            out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )
        return masks[:, 0].numpy().astype(bool)  # [K, 1, H, W] -> [K, H, W]


def stable_masks(masker, image: np.ndarray, boxes: np.ndarray, cfg: MaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """-> (masks bool [N, H, W], stability [N]): the box prompts' masks, and each one's mean IoU with the masks of
    its two jittered boxes (one masker call for all 3N prompts)."""
    n = len(boxes)
    prompts = np.concatenate([boxes, *jittered(boxes, cfg.mask_jitter)]) if cfg.min_mask_stability > 0 else boxes
    found = masker.masks(image, prompts)
    masks = found[:n]
    if cfg.min_mask_stability <= 0:
        return masks, np.ones(n)
    return masks, (mask_iou(masks, found[n : 2 * n]) + mask_iou(masks, found[2 * n :])) / 2


def add_masks(records: list[dict], masker, cfg: MaskConfig) -> tuple[list[dict], dict]:
    """Boxed records -> the same records with one mask per box (`masks`: COCO RLEs, empty where unstable) and
    counts {"images", "masks", "unstable", "skipped"}."""
    out, counts = [], dict(images=0, masks=0, unstable=0, skipped=0)
    for record in records:
        boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
        try:
            image = preprocess.decode(record["image"])  # full size: masks are stored at the image's own
        except transforms.BadImage:
            counts["skipped"] += 1
            out.append(record)
            continue
        masks, stability = stable_masks(masker, image, boxes, cfg)
        unstable = stability < cfg.min_mask_stability
        masks[unstable] = False
        out.append(dict(record, masks=pixel_masks.to_rle(masks)))
        counts["images"] += 1
        counts["masks"] += int((~unstable).sum())
        counts["unstable"] += int(unstable.sum())
    return out, counts
