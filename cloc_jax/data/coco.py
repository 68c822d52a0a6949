"""COCO-format annotation files + an image folder as a source of records.

Any mix of these files describes one image set (records are joined by image id):
- captions (`captions_train2017.json`): `annotations[{image_id, caption}]`;
- instances (`instances_*.json`) and LVIS (`lvis_v1_*.json`): `annotations[{id, image_id, bbox: [x, y,
  w, h] in pixels, category_id}]`, `categories[{id, name}]` (category names become `class_names`);
- instance masks: `segmentation` as polygons or RLE (compressed or not, as crowds have them), `iscrowd`;
- region captions: box annotations that also carry a `caption` (GRIT- or Visual Genome-style): the box's text;
- RefCOCO refs (`refs(unc).p` pickle as released, or the same list as JSON): `[{ann_id, split, sentences:
  [{sent}]}]`, attaching every referring expression to an instance box. `refs(unc).p:testA` keeps one
  split: only its images, and in them only the boxes it refers to (the RefCOCO protocol).
An image's tags (its instances' categories) are known only if an instances/LVIS file lists it: one that
only a captions file lists is untagged (`has_tags` False), not an image with nothing in it.
Images are `IMAGE_DIR/<file_name>` (LVIS: the basename of `coco_url`), read when a record is asked for.
"""

import json
import os
import pickle
from collections import defaultdict

import numpy as np

from cloc_jax.data.masks import polygons_to_rle
from cloc_jax.data.records import empty_record


def _load(path: str):
    if path.endswith(".p") or path.endswith(".pkl"):
        with open(path, "rb") as f:
            return pickle.load(f)  # the RefCOCO release format; only for files you trust
    with open(path) as f:
        return json.load(f)


def _split_suffix(path: str) -> tuple[str, str]:
    """`refs(unc).p:testA` -> (path, "testA"); a path that exists as given has no split."""
    head, sep, split = path.rpartition(":")
    return (head, split) if sep and not os.path.exists(path) and split and "/" not in split else (path, "")


class CocoSource:
    def __init__(self, annotation_files: list[str], image_dir: str):
        self.image_dir = image_dir
        images: dict[int, dict] = {}
        captions = defaultdict(list)
        objects = defaultdict(list)  # image id -> [(annotation id, bbox, category id, caption, segmentation)]
        crowd: set = set()  # annotation ids marked iscrowd
        categories: dict[int, str] = {}
        refs: dict[int, list[str]] = {}
        split_refs: set[int] | None = None  # annotation ids a refs split refers to (None: no split chosen)
        tagged: set[int] = set()  # images of an instances/LVIS file: their categories are annotated
        for entry in annotation_files:
            path, split = _split_suffix(entry)
            data = _load(path)
            if isinstance(data, list):  # RefCOCO refs
                for ref in data:
                    if split and ref.get("split") != split:
                        continue
                    refs[ref["ann_id"]] = [s.get("sent", "") for s in ref.get("sentences") or []]
                    if split:
                        split_refs = (split_refs or set()) | {ref["ann_id"]}
                continue
            for image in data.get("images", []):
                images[image["id"]] = image
            if "categories" in data and "annotations" in data:  # not captions, not test image info
                tagged.update(image["id"] for image in data.get("images", []))
            for category in data.get("categories", []):
                categories[category["id"]] = category["name"].replace("_", " ")
            for ann in data.get("annotations", []):
                if "bbox" in ann:
                    objects[ann["image_id"]].append(
                        (
                            ann.get("id"),
                            ann["bbox"],
                            ann.get("category_id"),
                            ann.get("caption"),
                            ann.get("segmentation"),
                        )
                    )
                    crowd.update([ann.get("id")] if ann.get("iscrowd") else [])
                elif "caption" in ann:
                    captions[ann["image_id"]].append(ann["caption"])
        if split_refs is not None:  # one RefCOCO split: its referred boxes, in the images that hold them
            objects = defaultdict(list, {i: [o for o in objs if o[0] in split_refs] for i, objs in objects.items()})
            images = {i: image for i, image in images.items() if objects[i]}
        if not images:
            raise ValueError(f"coco: no images in {annotation_files}")
        self.category_ids = sorted(categories)
        self.class_names = tuple(categories[i] for i in self.category_ids)
        self._label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.ids = sorted(images)
        self.images, self.captions, self.objects, self.refs, self.crowd = images, captions, objects, refs, crowd
        self.tagged = tagged

    def __len__(self) -> int:
        return len(self.ids)

    def _file(self, image: dict) -> str:
        name = image.get("file_name") or os.path.basename(image.get("coco_url", ""))
        return os.path.join(self.image_dir, name)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        meta = self.images[image_id]
        try:
            with open(self._file(meta), "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # a missing file is a corrupt image to the pipeline: skipped and counted
        record = empty_record(index, data)
        w, h = float(meta.get("width", 0) or 0), float(meta.get("height", 0) or 0)
        boxes, labels, referring = [], [], []
        texts, masks = [], []
        for ann_id, (x, y, bw, bh), category, caption, segmentation in self.objects[image_id]:
            masks.append(polygons_to_rle(segmentation, int(h), int(w)) if segmentation and w and h else None)
            boxes.append([x / w, y / h, (x + bw) / w, (y + bh) / h] if w and h else [np.nan] * 4)
            labels.append(self._label.get(category, -1))
            referring.append(self.refs.get(ann_id, []))
            texts.append(caption or (self.class_names[labels[-1]] if labels[-1] >= 0 else ""))
        record["captions"] = list(self.captions[image_id])
        record["boxes"] = np.asarray(boxes, np.float32).reshape(-1, 4)
        record["region_labels"] = np.asarray(labels, np.int32)
        record["region_texts"] = texts
        record["referring"] = referring
        record["tags"] = np.unique([i for i in labels if i >= 0]).astype(np.int32)
        record["has_tags"] = image_id in self.tagged
        record["crowd"] = np.array([o[0] in self.crowd for o in self.objects[image_id]], bool)
        if masks and all(m is not None for m in masks):  # masks are all or none: one per box
            record["masks"] = masks
        return record
