"""Segmentation data as sources of records: semantic-segmentation folders in each benchmark's standard layout, and
COCO panoptic files (COCO Panoptic, ADE20K panoptic).

    semseg:LAYOUT:ROOT                        a label folder and its images (LAYOUTS), e.g.
                                              semseg:ade150:/data/ADEChallengeData2016
    coco_panoptic:PANOPTIC.json@IMAGE_DIR     the JSON's segments and PNGs (in PANOPTIC/ beside the JSON, as COCO
                                              ships them, or @IMAGE_DIR@PNG_DIR)

Label values become class indices as each layout says (ADE20K-150's original PNGs count from 1, 0 unlabelled; the
detectron2-prepared sets count from 0 with 255 or 65535 unlabelled); a value outside the classes stays as it is, and
the pipeline drops that label map and counts it. Class names: `segmentation_classes.json` (its "_sources" say where
each list comes from).
"""

import dataclasses
import functools
import glob
import json
import os

import numpy as np
from PIL import Image

from cloc_jax.data.masks import IGNORE
from cloc_jax.data.records import empty_record

CLASSES_FILE = os.path.join(os.path.dirname(__file__), "segmentation_classes.json")


@functools.cache
def class_lists() -> dict:
    with open(CLASSES_FILE) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a benchmark keeps its validation images and label maps under its root, and what the values mean."""

    images: str  # folder of images, relative to the root
    labels: str  # folder of label maps
    label_ext: str  # ".png" or ".tif"
    classes: str  # key of segmentation_classes.json
    offset: int = 0  # class index = value - offset
    ignore: tuple[int, ...] = (255,)  # values that mean "unlabelled"
    image_ext: str = ".jpg"


LAYOUTS = {
    # ADEChallengeData2016 as downloaded: 0 = other (unlabelled), 1..150 -> 0..149 (mmsegmentation's reduce_zero_label)
    "ade150": Layout("images/validation", "annotations/validation", ".png", "ade150", offset=1, ignore=(0,)),
    # ADE20K_2021_17_01, prepared as FC-CLIP / SAN / CAT-Seg do: uint16 TIFFs 0..846, 65535 unlabelled
    "ade847": Layout(
        "images_detectron2/validation", "annotations_detectron2/validation", ".tif", "ade847", ignore=(65535,)
    ),
    # VOCdevkit/VOC2010 with CAT-Seg's prepared Pascal Context labels
    "pc59": Layout("JPEGImages", "annotations_detectron2/pc59_val", ".png", "pc59"),
    "pc459": Layout("JPEGImages", "annotations_detectron2/pc459_val", ".tif", "pc459", ignore=(65535,)),
    # VOCdevkit/VOC2012, 20 classes without background (PAS-20), background and borders 255
    "voc": Layout("JPEGImages", "annotations_detectron2/val", ".png", "voc20"),
    # coco/ with the 171-class COCO-Stuff maps (stuffthingmaps_detectron2), 255 unlabelled
    "cocostuff": Layout("val2017", "stuffthingmaps_detectron2/val2017", ".png", "cocostuff171"),
}


def _to_classes(values: np.ndarray, layout: Layout) -> np.ndarray:
    values = values.astype(np.int64)
    return np.where(np.isin(values, layout.ignore), IGNORE, values - layout.offset).astype(np.int32)


class SemanticFolder:
    """Images and label maps paired by file name (labels without an image are left out and counted in
    `missing_images`)."""

    def __init__(self, layout: str, root: str):
        if layout not in LAYOUTS:
            raise ValueError(f"semseg layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        self.layout = LAYOUTS[layout]
        self.image_dir = os.path.join(root, self.layout.images)
        labels = sorted(glob.glob(os.path.join(root, self.layout.labels, "*" + self.layout.label_ext)))
        if not labels:
            raise FileNotFoundError(
                f"semseg:{layout}: no {self.layout.label_ext} label maps in {root}/{self.layout.labels}"
            )
        self.labels = [p for p in labels if os.path.exists(self._image(p))]
        self.missing_images = len(labels) - len(self.labels)
        if not self.labels:
            raise FileNotFoundError(
                f"semseg:{layout}: none of the {len(labels)} label maps has an image in {self.image_dir}"
            )
        self.class_names = tuple(name.strip() for name in class_lists()[self.layout.classes])

    def _image(self, label_path: str) -> str:
        stem = os.path.splitext(os.path.basename(label_path))[0]
        return os.path.join(self.image_dir, stem + self.layout.image_ext)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        path = self.labels[index]
        with open(self._image(path), "rb") as f:
            record = empty_record(index, f.read())
        try:
            record["semantic"] = _to_classes(np.asarray(Image.open(path)), self.layout)
        except OSError:
            record["semantic"] = b"\0"  # unreadable: the pipeline drops it and counts corrupt_semantic
        return record


class PanopticSource:
    """COCO panoptic format: JSON {"images", "annotations": [{"image_id", "file_name", "segments_info": [{"id",
    "category_id", "iscrowd", "bbox"}]}], "categories": [{"id", "name", "isthing"}]} and one PNG per image."""

    def __init__(self, json_path: str, image_dir: str, png_dir: str = ""):
        with open(json_path) as f:
            data = json.load(f)
        self.png_dir = png_dir or os.path.splitext(json_path)[0]
        self.image_dir = image_dir
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.class_names = tuple(
            c["name"].replace("_", " ").replace("-merged", "").replace("-other", "") for c in categories
        )
        self._label = {c["id"]: i for i, c in enumerate(categories)}
        images = {image["id"]: image for image in data.get("images", [])}
        self.annotations = [(images.get(a["image_id"], {}), a) for a in data["annotations"]]
        if not self.annotations:
            raise ValueError(f"coco_panoptic: no annotations in {json_path}")

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> dict:
        image, annotation = self.annotations[index]
        name = image.get("file_name") or os.path.splitext(annotation["file_name"])[0] + ".jpg"
        try:
            with open(os.path.join(self.image_dir, name), "rb") as f:
                data = f.read()
            with open(os.path.join(self.png_dir, annotation["file_name"]), "rb") as f:
                png = f.read()
        except OSError:
            data, png = b"", b""  # skipped and counted by the pipeline (missing_image)
        record = empty_record(index, data)
        segments = annotation["segments_info"]
        w, h = float(image.get("width", 0) or 0), float(image.get("height", 0) or 0)
        boxes = [
            [x / w, y / h, (x + bw) / w, (y + bh) / h] if w and h else [np.nan] * 4
            for x, y, bw, bh in (s["bbox"] for s in segments)
        ]
        labels = [self._label.get(s["category_id"], -1) for s in segments]
        record.update(
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            region_labels=np.asarray(labels, np.int32),
            region_texts=[self.class_names[i] if i >= 0 else "" for i in labels],
            referring=[[] for _ in segments],
            tags=np.unique([i for i in labels if i >= 0]).astype(np.int32),
            has_tags=True,
            crowd=np.asarray([bool(s.get("iscrowd", 0)) for s in segments], bool),
            masks=dict(panoptic=png, ids=[s["id"] for s in segments]) if png else [],
        )
        return record
