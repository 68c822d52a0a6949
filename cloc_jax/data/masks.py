"""The pixel level of a record: instance masks per box and a semantic label map, in their compact forms.

A record's `masks` is one of
- [] (none known),
- a list of N COCO RLE dicts ({"size": [h, w], "counts": bytes | str}), one per box (pycocotools decodes them),
- a bool array [N, H, W] (sources that render masks, as the embedded scenes do),
- {"panoptic": PNG bytes, "ids": [N]}: a COCO panoptic PNG (segment id = R + 256 G + 256^2 B, 0 = void) and the
  segment id of each box.
A record's `semantic` is b"" (none), an encoded 8- or 16-bit PNG / TIFF, or an int array [H, W]: the class index of
each pixel into the source's `segmentation_classes`, IGNORE where unlabelled (255 in an 8-bit file, 65535 in a
16-bit one, as the benchmarks store them).
`decode_masks` / `decode_semantic` turn them into arrays, naming the problem (a skip counter) when they cannot be
used: a mask of another size than the image, a panoptic PNG with ids its segments do not list, a class index out of
range.
"""

import io

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

IGNORE = -1  # an unlabelled pixel in a label map (int32); in files the largest value of their bit depth


def polygons_to_rle(polygons: list, height: int, width: int) -> dict:
    """COCO polygons ([[x0, y0, x1, y1, ...], ...] in pixels), an uncompressed RLE ({"counts": [ints]}) or a
    compressed one -> one compressed RLE (the union of the parts)."""
    if isinstance(polygons, dict):
        if isinstance(polygons.get("counts"), list):
            return coco_mask.frPyObjects(polygons, height, width)
        return polygons
    parts = coco_mask.frPyObjects([p for p in polygons if len(p) >= 6], height, width)
    return coco_mask.merge(parts) if parts else coco_mask.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]


def to_rle(masks: np.ndarray) -> list[dict]:
    """bool [N, H, W] -> N compressed RLE dicts (counts as bytes), the on-disk form."""
    if not len(masks):
        return []
    return coco_mask.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """A COCO panoptic PNG's pixels uint8 [H, W, 3] -> segment ids int64 [H, W] (R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def decode_masks(masks, n: int, height: int, width: int) -> tuple[np.ndarray | None, str | None]:
    """A record's `masks` for its n boxes -> (bool [n, H, W] or None when it has none, the problem or None)."""
    if masks is None or (isinstance(masks, list | tuple) and not len(masks)):
        return None, None
    try:
        if isinstance(masks, dict):
            ids = rgb_to_id(np.asarray(Image.open(io.BytesIO(masks["panoptic"])).convert("RGB")))
            wanted = np.asarray(masks["ids"], np.int64).reshape(-1)
            if ids.shape != (height, width):
                return None, "masks_wrong_size"
            if np.setdiff1d(np.unique(ids), np.append(wanted, 0)).size:
                return None, "panoptic_unknown_ids"
            out = ids[None] == wanted[:, None, None]
        elif isinstance(masks, np.ndarray):
            out = masks.astype(bool)
        else:
            out = np.moveaxis(coco_mask.decode(list(masks)), -1, 0).astype(bool)
    except Exception:  # a truncated PNG, an RLE pycocotools cannot read
        return None, "corrupt_masks"
    if out.ndim != 3 or out.shape[1:] != (height, width):
        return None, "masks_wrong_size"
    if len(out) != n:
        return None, "masks_not_one_per_box"
    return out, None


def semantic_values(data) -> np.ndarray | None:
    """A record's `semantic` -> int64 [H, W] as stored (IGNORE for unlabelled), None when it has none. Raises on a
    file PIL cannot read."""
    if data is None or (isinstance(data, bytes | np.ndarray) and not len(data)):
        return None
    if isinstance(data, np.ndarray):
        return data.astype(np.int64)
    stored = np.asarray(Image.open(io.BytesIO(data)))
    unlabelled = 255 if stored.dtype == np.uint8 else 65535
    return np.where(stored == unlabelled, IGNORE, stored.astype(np.int64))


def decode_semantic(
    data, height: int, width: int, num_classes: int, remap: np.ndarray | None = None
) -> tuple[np.ndarray | None, str | None]:
    """A record's `semantic` -> (int32 [H, W] class indices, IGNORE where unlabelled, or None; the problem). `remap`
    (a mixture's `semantic_remap`: each source class's index in the mixture's classes, then -1) moves the classes
    into the mixture's vocabulary; a value outside the source's classes stays outside the mixture's."""
    try:
        values = semantic_values(data)
    except Exception:
        return None, "corrupt_semantic"
    if values is None:
        return None, None
    if values.shape != (height, width):
        return None, "semantic_wrong_size"
    if remap is not None:
        known = (values >= 0) & (values < len(remap) - 1)
        moved = np.where(known, remap[np.clip(values, 0, len(remap) - 2)], num_classes + values)
        values = np.where(values < 0, IGNORE, moved)
    if ((values < IGNORE) | (values >= num_classes)).any():
        return None, "semantic_class_out_of_range"
    return values.astype(np.int32), None


def encode_semantic(labels: np.ndarray) -> bytes:
    """int [H, W] class indices (IGNORE unlabelled) -> a PNG, 8-bit when every class is below 255 (decodes in about
    half the time), else 16-bit (the on-disk form)."""
    narrow = labels.max(initial=0) < 255
    values = np.where(labels < 0, 255 if narrow else 65535, labels).astype(np.uint8 if narrow else np.uint16)
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG")
    return out.getvalue()


def paint(masks: np.ndarray, labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Instance masks [N, H, W] and their classes [N] -> a label map int32 [H, W] (IGNORE where no mask or the
    class is unknown; a later mask paints over an earlier one)."""
    out = np.full((height, width), IGNORE, np.int32)
    for mask, label in zip(masks, labels):
        out[mask] = label if label >= 0 else IGNORE
    return out
