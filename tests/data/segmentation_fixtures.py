"""Segmentation data on disk, made from embedded scenes (their masks and label maps are exact): each semantic
benchmark's folder layout (data/segmentation.py LAYOUTS) and COCO panoptic JSON + PNGs."""

import json
import os

import numpy as np
from PIL import Image

from cloc_jax.data.masks import IGNORE
from cloc_jax.data.scenes import Scenes
from cloc_jax.data.segmentation import LAYOUTS, class_lists


def scenes(n: int, image_size: int = 40, split: str = "heldout") -> list[dict]:
    source = Scenes(split, size=n, image_size=image_size)
    return [source[i] for i in range(n)]


def benchmark_labels(semantic: np.ndarray, num_classes: int) -> np.ndarray:
    """A scene's label map in a benchmark's class range: scene class k -> k mod C; background stays IGNORE."""
    return np.where(semantic >= 40, IGNORE, semantic % num_classes)


def write_semseg(root: str, layout_name: str, recs: list[dict]) -> str:
    """The scenes in `layout_name`'s layout under `root` -> the `semseg:` spec. Label values as the benchmark
    stores them (offset, its ignore value; 16-bit TIFFs where it uses them)."""
    layout = LAYOUTS[layout_name]
    num_classes = len(class_lists()[layout.classes])
    os.makedirs(os.path.join(root, layout.images), exist_ok=True)
    os.makedirs(os.path.join(root, layout.labels), exist_ok=True)
    for r in recs:
        stem = f"img_{int(r['index']):05d}"
        Image.fromarray(r["image"]).save(os.path.join(root, layout.images, stem + layout.image_ext), quality=95)
        labels = benchmark_labels(r["semantic"], num_classes)
        stored = np.where(labels == IGNORE, layout.ignore[0], labels + layout.offset)
        dtype = np.uint16 if layout.label_ext == ".tif" else np.uint8
        Image.fromarray(stored.astype(dtype)).save(os.path.join(root, layout.labels, stem + layout.label_ext))
    return f"semseg:{layout_name}:{root}"


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def write_panoptic(root: str, recs: list[dict]) -> str:
    """COCO panoptic files of the scenes: each shape a thing segment (ids from 1000 up), the background one stuff
    segment -> the `coco_panoptic:` spec."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "panoptic"), exist_ok=True)
    images, annotations = [], []
    for r in recs:
        h, w = r["image"].shape[:2]
        name = f"{int(r['index']):05d}"
        Image.fromarray(r["image"]).save(os.path.join(root, "images", name + ".png"))
        ids = np.full((h, w), 7, np.int64)  # background: segment 7, category 40
        segments = [dict(id=7, category_id=40, iscrowd=0, bbox=[0, 0, w, h])]
        for k, (mask, label, box) in enumerate(zip(r["masks"], r["region_labels"], r["boxes"])):
            ids[mask] = 1000 + k
            x0, y0, x1, y1 = box * np.array([w, h, w, h])
            segments.append(dict(id=1000 + k, category_id=int(label), iscrowd=0, bbox=[x0, y0, x1 - x0, y1 - y0]))
        Image.fromarray(id_to_rgb(ids)).save(os.path.join(root, "panoptic", name + ".png"))
        images.append(dict(id=int(r["index"]), file_name=name + ".png", width=w, height=h))
        annotations.append(dict(image_id=int(r["index"]), file_name=name + ".png", segments_info=segments))
    from cloc_jax.data.scenes import CLASS_NAMES

    categories = [dict(id=i, name=n, isthing=1) for i, n in enumerate(CLASS_NAMES)]
    categories.append(dict(id=40, name="background", isthing=0))
    with open(os.path.join(root, "panoptic.json"), "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return f"coco_panoptic:{root}/panoptic.json@{root}/images"
