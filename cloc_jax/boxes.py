"""Boxes: xyxy in [0, 1] (normalised to the image). IoU / GIoU, format changes and input repair.

Works on numpy and jax arrays alike (`xp` is picked from the input), so the data pipeline and the
losses share one implementation.
"""

import jax.numpy as jnp
import numpy as np

MIN_SIDE = 1e-3  # boxes thinner than this (in image fractions) carry no region


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def area(boxes):
    """[..., 4] xyxy -> [...]"""
    xp = _xp(boxes)
    return xp.clip(boxes[..., 2] - boxes[..., 0], 0, None) * xp.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def iou_and_giou(a, b):
    """Elementwise over matching leading dims: ([..., 4], [..., 4]) -> (iou [...], giou [...])."""
    xp = _xp(a)
    lo, hi = xp.maximum(a[..., :2], b[..., :2]), xp.minimum(a[..., 2:], b[..., 2:])
    inter = xp.prod(xp.clip(hi - lo, 0, None), axis=-1)
    union = area(a) + area(b) - inter
    iou = inter / xp.maximum(union, 1e-9)
    hull = xp.prod(xp.maximum(a[..., 2:], b[..., 2:]) - xp.minimum(a[..., :2], b[..., :2]), axis=-1)
    return iou, iou - (hull - union) / xp.maximum(hull, 1e-9)


def referring_expressions(boxes: np.ndarray, names: list[str]) -> list[str]:
    """[K, 4] xyxy boxes and their names -> a referring expression per box: "the <name> <relation> the
    <nearest other box's name>" (relation along the axis where the centres differ most), or "the <name>"
    when it is alone. The embedded dataset is written this way, and pseudo-labels get the same."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) == 1:
        return [f"the {names[0]}"]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    out = []
    for i, name in enumerate(names):
        dist = np.linalg.norm(centres - centres[i], axis=1)
        dist[i] = np.inf
        j = int(np.argmin(dist))
        dx, dy = centres[i] - centres[j]
        horizontal = "left of" if dx < 0 else "right of"
        relation = horizontal if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        out.append(f"the {name} {relation} the {names[j]}")
    return out


def cxcywh_to_xyxy(boxes):
    xp = _xp(boxes)
    centre, size = boxes[..., :2], boxes[..., 2:]
    return xp.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def repair(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, 4] boxes from the wild -> (repaired boxes, keep [K] bool).

    Swapped corners are reordered, coordinates clipped to [0, 1]; boxes with NaN/inf or (after
    clipping) a side under MIN_SIDE are dropped, never passed on to poison a loss.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    boxes = np.where(finite[:, None], boxes, 0.0)
    lo, hi = np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])
    boxes = np.clip(np.concatenate([lo, hi], axis=1), 0.0, 1.0)
    keep = finite & ((boxes[:, 2:] - boxes[:, :2]) >= MIN_SIDE).all(axis=1)
    return boxes, keep


def cell_coverage(boxes, h: int, w: int):
    """[B, M, 4] xyxy in [0, 1] -> [B, M, h*w]: the share of each box's area falling in each cell of an
    h x w grid (rows sum to 1 for boxes with area), for pooling a token grid inside boxes."""
    ys0, xs0 = jnp.arange(h) / h, jnp.arange(w) / w
    cover_x = jnp.clip(jnp.minimum(boxes[..., 2:3], xs0 + 1 / w) - jnp.maximum(boxes[..., 0:1], xs0), 0, None)
    cover_y = jnp.clip(jnp.minimum(boxes[..., 3:4], ys0 + 1 / h) - jnp.maximum(boxes[..., 1:2], ys0), 0, None)
    cover = (cover_y[..., :, None] * cover_x[..., None, :]).reshape(*boxes.shape[:-1], h * w)
    return cover / jnp.maximum(cover.sum(-1, keepdims=True), 1e-9)


def cell_boxes(h: int, w: int) -> np.ndarray:
    """float32 [h * w, 4]: the cells of an h x w grid over the unit square as xyxy boxes, row by row (a token's
    patch, for dense outputs: `models.heads.RegionHead.dense`)."""
    ys, xs = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    return np.stack([xs, ys, xs + 1 / w, ys + 1 / h], -1).reshape(h * w, 4).astype(np.float32)
