"""The embedded dataset: procedurally generated scenes of coloured shapes, deterministic by seed.

Each scene has an image caption, one box, region caption, exact mask and referring expression per object, and
a label map (each pixel its object's class, or "background"). Some colour-shape combinations never appear in the
train split, so held-out evaluation tests composition, not memory. It needs no download and renders an image in
well under a millisecond.
"""

import os

import numpy as np

from cloc_jax.boxes import referring_expressions

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # label = index into this tuple
BACKGROUND = len(CLASS_NAMES)  # the label maps' class of pixels outside every shape
# One combination per shape is never seen in training; every colour and shape still is.
HELDOUT_COMBOS = frozenset({"red circle", "green square", "blue triangle", "yellow diamond", "purple cross"})
SIZES = {"small": (0.08, 0.12), "large": (0.15, 0.21)}  # half-extent as a fraction of the image side
SPLITS = {"train": 0, "heldout": 1}
WORDS = os.path.join(os.path.dirname(__file__), "scenes_words.txt")  # every word the texts use (tokenizer.type="words")
MAX_OBJECTS = 4


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    return ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r))


def _overlaps(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    for other in boxes:
        w = min(box[2], other[2]) - max(box[0], other[0])
        h = min(box[3], other[3]) - max(box[1], other[1])
        if w > -0.02 and h > -0.02:
            return True
    return False


class Scenes:
    """A grain random-access source: `len()` and `[index] -> dict` of numpy arrays and strings."""

    class_names = CLASS_NAMES
    segmentation_classes = (*CLASS_NAMES, "background")  # what the label maps index (`BACKGROUND`)

    def __init__(self, split: str = "train", size: int = 100_000, image_size: int = 64, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"scenes split={split!r}; choose one of {sorted(SPLITS)}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        allowed = [n for n in CLASS_NAMES if split != "train" or n not in HELDOUT_COMBOS]
        self.combos = np.array([CLASS_NAMES.index(n) for n in allowed])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], int(index)])
        side = self.image_size
        image = rng.integers(20, 70, size=3).astype(np.float32) + rng.normal(0, 6, (side, side, 3))
        yy, xx = np.mgrid[0:side, 0:side] + 0.5
        num = int(rng.integers(1, MAX_OBJECTS + 1))
        labels = rng.choice(self.combos, size=num, replace=False)
        boxes, kept, sizes, masks = [], [], [], []
        for label in labels:
            size = "large" if rng.random() < 0.5 else "small"
            r = rng.uniform(*SIZES[size])
            for _ in range(20):  # rejection-sample a free spot; drop the object if there is none
                cy, cx = rng.uniform(r, 1 - r, size=2)
                box = np.array([cx - r, cy - r, cx + r, cy + r], np.float32)
                if not _overlaps(box, boxes):
                    break
            else:
                continue
            colour, shape = CLASS_NAMES[label].split()
            mask = _shape_mask(shape, yy / side, xx / side, cy, cx, r)
            image[mask] = np.array(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.0)
            boxes.append(box)
            kept.append(int(label))
            sizes.append(size)
            masks.append(mask)
        boxes = np.stack(boxes)
        order = np.argsort(boxes[:, 0])  # left to right, so the caption reads like the picture
        boxes, kept, sizes = boxes[order], [kept[i] for i in order], [sizes[i] for i in order]
        masks = np.stack(masks)[order]
        semantic = np.full((side, side), BACKGROUND, np.int32)
        for mask, label in zip(masks, kept):  # (shapes never overlap: their boxes do not)
            semantic[mask] = label
        region_texts = [f"{s} {CLASS_NAMES[c]}" for s, c in zip(sizes, kept)]
        caption = ", ".join(f"a {t}" for t in region_texts[:-1])
        caption = f"{caption} and a {region_texts[-1]}" if caption else f"a {region_texts[-1]}"
        referring = referring_expressions(boxes, [CLASS_NAMES[label] for label in kept])
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return dict(
            index=np.int64(index),
            image=np.clip(image, 0, 255).astype(np.uint8),
            captions=[caption],
            boxes=boxes.clip(0, 1),
            region_texts=region_texts,
            region_labels=np.array(kept, np.int32),
            tags=np.unique(np.array(kept, np.int32)),  # image-level tags: indices into class_names
            has_tags=True,
            referring=referring,
            label=np.int32(kept[int(np.argmax(areas))]),  # the largest object names the image
            masks=masks,
            crowd=np.zeros(len(kept), bool),
            semantic=semantic,
        )
