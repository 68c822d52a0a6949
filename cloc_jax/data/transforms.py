"""Image and box transforms for one record, in numpy/PIL (they run in grain's worker threads).

Every geometric transform returns the image and the boxes moved with it (xyxy, normalised to the
output image), so a box always frames the same content. Randomness comes from the caller's
`np.random.Generator` (grain seeds it from the config seed and the record index): deterministic.
"""

import io
import re

import numpy as np
from PIL import Image

from cloc_jax.boxes import MIN_SIDE

MAX_PIXELS = 16_000**2 // 2  # larger images are skipped unless JPEG can decode them downscaled
# PIL refuses > 179 MP at open; data/preprocess.py applies MAX_PIXELS itself, after JPEG's downscaled draft.
Image.MAX_IMAGE_PIXELS = None
RESIZES = ("pad", "crop")  # long-side resize + pad (CLOC), random resized crop (CLIP)
FLIP_TEXTS = ("swap", "skip")  # on flip: swap left/right in texts, or do not flip images that mention them
_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


class BadImage(ValueError):
    """An image that cannot be used; `reason` names the skip counter it goes to."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def encode_image(image: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt)
    return out.getvalue()


def resize(image: np.ndarray, height: int, width: int, resample=Image.BICUBIC) -> np.ndarray:
    """uint8 [H, W, 3] -> [height, width, 3] by PIL's (antialiasing) filter `resample`."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def letterbox_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of an image whose long side is resized to `size`, each side at least 1 pixel."""
    scale = size / max(height, width)
    return max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))


def resize_pad(
    image: np.ndarray, boxes: np.ndarray, size: int, resample=Image.BICUBIC
) -> tuple[np.ndarray, np.ndarray]:
    """Long side -> `size`, then zero padding right and bottom to [size, size, 3]; boxes follow."""
    nh, nw = letterbox_size(*image.shape[:2], size)
    out = np.zeros((size, size, 3), np.uint8)
    out[:nh, :nw] = resize(image, nh, nw, resample)
    return out, boxes * np.array([nw, nh, nw, nh], np.float32) / size


def random_resized_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """CLIP's crop: an area fraction in `scale`, aspect ratio in `ratio` (log-uniform), resized to
    [size, size]. Boxes are re-expressed in the crop (they may now stick out: see `clip_boxes`).
    -> (crop, boxes, the window (x0, y0, width, height) in image pixels)."""
    h, w = image.shape[:2]
    ch, cw = h, w
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        ch, cw = h, w
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = resize(image[y0 : y0 + ch, x0 : x0 + cw], size, size)
    offset = np.array([x0 / w, y0 / h, x0 / w, y0 / h], np.float32)
    stretch = np.array([w / cw, h / ch, w / cw, h / ch], np.float32)
    return crop, (boxes - offset) * stretch, (x0, y0, cw, ch)


def clip_boxes(boxes: np.ndarray, min_visible: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to the image; keep [N] is False for boxes that left it (side < MIN_SIDE) or kept
    less than `min_visible` of their area."""
    clipped = np.clip(boxes, 0.0, 1.0)
    sides = clipped[:, 2:] - clipped[:, :2]
    full = np.prod(np.maximum(boxes[:, 2:] - boxes[:, :2], 1e-12), axis=1)
    keep = (sides >= MIN_SIDE).all(axis=1) & (np.prod(np.maximum(sides, 0), axis=1) >= min_visible * full)
    return clipped, keep


def swap_left_right(text: str) -> str:
    """'the cup left of the plate' -> 'the cup right of the plate' (case kept)."""

    def swap(match: re.Match) -> str:
        word = {"left": "right", "right": "left"}[match.group(1).lower()]
        word = word.capitalize() if match.group(1)[0].isupper() else word
        return word + (match.group(2) or "")

    return _LEFT_RIGHT.sub(swap, text)


def mentions_left_right(texts) -> bool:
    return any(_LEFT_RIGHT.search(t) for t in texts)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return image[:, ::-1], np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
