"""Karpathy & Fei-Fei's caption splits (`dataset_coco.json`, `dataset_flickr30k.json`) as a source: the
files every image-text retrieval paper evaluates on (COCO 5k test, Flickr30k 1k test).

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                 "sentences": [{"raw": "A man with a red helmet ..."}, ...]}, ...]}

`split` keeps one split ("restval" is COCO's extra training images); images are IMAGE_DIR/[filepath/]filename,
read when a record is asked for; every sentence is a caption.
"""

import json
import os

from cloc_jax.data.records import empty_record

SPLITS = ("train", "restval", "val", "test")


class KarpathySource:
    class_names = ()

    def __init__(self, path: str, split: str, image_dir: str):
        if split not in SPLITS:
            raise ValueError(f"karpathy split={split!r}; choose one of {SPLITS}")
        with open(path) as f:
            images = json.load(f).get("images", [])
        self.images = [image for image in images if image.get("split") == split]
        if not self.images:
            raise ValueError(f"karpathy: no images of split {split!r} in {path}")
        self.image_dir = image_dir

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        try:
            with open(os.path.join(self.image_dir, image.get("filepath", ""), image["filename"]), "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # a missing file is a corrupt image to the pipeline: skipped and counted
        record = empty_record(index, data)
        record["captions"] = [s.get("raw", "") for s in image.get("sentences", [])]
        return record
