"""WebDataset tar shards (as UMG-41M is released) as a random-access source of records.

A sample is the files of one key (`dir/name` up to the first dot): an image (`.jpg`, `.png`, ...) and a
`.json` holding any of

    {"caption": str, "captions": [str], "tags": [str], "width": int, "height": int,
     "regions" | "objects" | "annotations": [{"bbox" | "box": [x1, y1, x2, y2],
                                              "caption" | "text" | "phrase" | "category": str,
                                              "referring": str}]}

Boxes are xyxy: normalised when every coordinate is <= 1, else pixels (normalised by the JSON's width
and height, or the image's). Tags and region names index `class_names.json` beside the shards when it
exists; a sample has tags (`has_tags`) only with that vocabulary and a `tags` key, even an empty one.
The tars are indexed once (headers only) and then read by offset, so grain can shuffle globally.
"""

import glob
import io
import json
import os
import re
import tarfile

import numpy as np
from PIL import Image

from cloc_jax.data.records import empty_record, read_class_names

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_TEXT_KEYS = ("caption", "text", "phrase", "category", "label")


def expand(pattern: str) -> list[str]:
    """'/d/{00000..00002}.tar' -> the three paths (WebDataset's brace ranges); other patterns are globs."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.group(1), match.group(2)
        return [
            pattern[: match.start()] + str(i).zfill(len(lo)) + pattern[match.end() :]
            for i in range(int(lo), int(hi) + 1)
        ]
    return sorted(glob.glob(pattern))


def _index(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {extension: (offset, size)} for one tar; a truncated tar keeps the members before the damage."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                stem, _, extension = name.partition(".")
                samples.setdefault(os.path.join(folder, stem), {})[extension.lower()] = (
                    member.offset_data,
                    member.size,
                )
    except (tarfile.TarError, OSError) as error:
        print(f"webdataset: {path} is damaged after {len(samples)} samples ({error}); using those")
    return samples


class WebDatasetSource:
    def __init__(self, pattern: str):
        self.paths = [p for p in expand(pattern) if os.path.exists(p)]
        if not self.paths:
            raise FileNotFoundError(f"webdataset: no tar shards match {pattern!r}")
        self.samples = []  # (shard, {extension: (offset, size)})
        for shard in self.paths:
            for _, files in sorted(_index(shard).items()):
                self.samples.append((shard, files))
        self.class_names = read_class_names(os.path.dirname(self.paths[0]))
        self._label = {name: i for i, name in enumerate(self.class_names)}

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _read(shard: str, where: tuple[int, int]) -> bytes:
        with open(shard, "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def __getitem__(self, index: int) -> dict:
        shard, files = self.samples[index]
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        image = self._read(shard, files[image_ext]) if image_ext else b""
        record = empty_record(index, image)
        try:
            meta = (
                json.loads(self._read(shard, files["json"]).decode("utf-8", errors="replace"))
                if "json" in files
                else {}
            )
        except json.JSONDecodeError:
            meta = {}  # unreadable metadata: the image alone (no text -> the pipeline skips and counts it)
        captions = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
        record["captions"] = [str(c) for c in captions]
        regions = meta.get("regions") or meta.get("objects") or meta.get("annotations") or []
        boxes = np.asarray([r.get("bbox", r.get("box", [np.nan] * 4)) for r in regions], np.float32).reshape(-1, 4)
        if boxes.size and np.nanmax(boxes) > 1.0:
            w, h = meta.get("width"), meta.get("height")
            if not (w and h):
                try:
                    w, h = Image.open(io.BytesIO(image)).size  # the header only
                except Exception:
                    w = h = np.nan  # the image is broken anyway
            boxes = boxes / np.array([w, h, w, h], np.float32)
        texts = [next((str(r[k]) for k in _TEXT_KEYS if r.get(k)), "") for r in regions]
        record["boxes"] = boxes
        record["region_texts"] = texts
        record["region_labels"] = np.asarray([self._label.get(t, -1) for t in texts], np.int32)
        record["referring"] = [str(r.get("referring", "")) for r in regions]
        record["tags"] = np.unique([self._label[t] for t in meta.get("tags", []) if t in self._label]).astype(np.int32)
        record["has_tags"] = bool(self.class_names) and "tags" in meta
        return record
