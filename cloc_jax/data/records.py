"""The record schema every source yields, and its on-disk form: msgpack records in ArrayRecord shards.

A record (a dict) is what the pipeline's `Preprocess` reads, whatever the source:

    index         int                  position in the source (for reproducibility and debugging)
    image         bytes | uint8 array  encoded (JPEG/PNG/...) or decoded [H, W, C]
    captions      list[str]            zero or more image captions
    boxes         float32 [N, 4]       xyxy, normalised to [0, 1] by the image's width and height
    region_texts  list[str] (N)        a caption or class name per box
    region_labels int32 [N]            index into the source's `class_names`, -1 when unknown
    referring     list[str | list[str]] (N)  the referring expressions of each box: one, several or none ("", [])
    tags          int32 [T]            image-level tags, indices into `class_names`
    has_tags      bool                 whether the source annotates tags: if not, `tags` is unknown, not empty
    label         int                  image class (index into `class_names`), -1 when unknown
    masks         [] | RLE list (N) | bool [N, H, W] | {"panoptic": PNG, "ids": [N]}   instance masks per box
    crowd         bool [N]             COCO's iscrowd: the box covers a crowd of its class
    semantic      b"" | PNG bytes | int [H, W]   class per pixel (`data/masks.py`: forms, IGNORE)
    semantic_remap  int [C + 1]        (in memory only, from a mixture) the label map's classes in the mixture's

On disk each record is one msgpack map with the same keys (boxes as a list of 4-lists, the image
always encoded, masks as COCO RLE and the label map as an 8- or 16-bit PNG), in ArrayRecord shards (random
access, which grain needs for global shuffling and resumable iterators). A shard set's class vocabulary
sits beside it in `<dir>/class_names.json`.
"""

import glob
import json
import os

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from cloc_jax.data import masks as pixel_masks

CLASS_NAMES_FILE = "class_names.json"


def empty_record(index: int, image) -> dict:
    """A record with an image and nothing else (fields default to 'none known')."""
    return dict(
        index=index,
        image=image,
        captions=[],
        boxes=np.zeros((0, 4), np.float32),
        region_texts=[],
        region_labels=np.zeros((0,), np.int32),
        referring=[],
        tags=np.zeros((0,), np.int32),
        has_tags=False,
        label=-1,
        masks=[],
        crowd=np.zeros((0,), bool),
        semantic=b"",
    )


def _masks_on_disk(masks):
    """A record's masks in their msgpack form: arrays become RLE; RLE counts and panoptic PNGs stay bytes."""
    if isinstance(masks, np.ndarray):
        masks = pixel_masks.to_rle(masks)
    if isinstance(masks, dict):
        return dict(panoptic=masks["panoptic"], ids=[int(i) for i in masks["ids"]])
    return [dict(size=[int(v) for v in m["size"]], counts=m["counts"]) for m in masks]


def _masks_from_disk(raw):
    """The msgpack form (raw keys: bytes) back to a record's masks."""
    if isinstance(raw, dict):
        return dict(panoptic=raw.get(b"panoptic", b""), ids=list(raw.get(b"ids", [])))
    return [dict(size=list(m[b"size"]), counts=m[b"counts"]) for m in raw or []]


def serialize(record: dict) -> bytes:
    image = record["image"]
    if not isinstance(image, bytes):
        raise ValueError("serialize: the record's image must be encoded bytes (see transforms.encode_image)")
    return msgpack.packb(
        dict(
            image=image,
            captions=list(record["captions"]),
            boxes=np.asarray(record["boxes"], np.float32).reshape(-1, 4).tolist(),
            region_texts=list(record["region_texts"]),
            region_labels=np.asarray(record["region_labels"], np.int64).tolist(),
            referring=list(record["referring"]),
            tags=np.asarray(record["tags"], np.int64).tolist(),
            has_tags=bool(record["has_tags"]),
            label=int(record["label"]),
            masks=_masks_on_disk(record.get("masks", [])),
            crowd=np.asarray(record.get("crowd", []), bool).tolist(),
            semantic=_semantic_on_disk(record.get("semantic", b"")),
        )
    )


def _semantic_on_disk(semantic) -> bytes:
    if isinstance(semantic, np.ndarray):
        return pixel_masks.encode_semantic(semantic)
    return bytes(semantic or b"")


def deserialize(data: bytes, index: int) -> dict:
    """msgpack bytes -> record. Text that is not valid UTF-8 is decoded with replacement characters;
    an unreadable record becomes one without an image (the pipeline skips and counts it)."""
    try:
        raw = msgpack.unpackb(data, raw=True, strict_map_key=False)  # raw: bad UTF-8 cannot raise here
        if not isinstance(raw, dict):
            raise ValueError("not a map")
    except ValueError:  # msgpack's errors derive from ValueError
        return empty_record(index, b"")
    text = lambda x: x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)  # noqa: E731
    get = lambda key, default: raw.get(key.encode(), default)  # noqa: E731
    n = len(get("boxes", []))
    return dict(
        index=index,
        image=get("image", b""),
        captions=[text(c) for c in get("captions", [])],
        boxes=np.asarray(get("boxes", []), np.float32).reshape(n, 4),
        region_texts=[text(t) for t in get("region_texts", [])],
        region_labels=np.asarray(get("region_labels", []), np.int32),
        referring=[[text(x) for x in t] if isinstance(t, list) else text(t) for t in get("referring", [])],
        tags=np.asarray(get("tags", []), np.int32),
        has_tags=bool(get("has_tags", b"tags" in raw)),  # shards from before the flag: tagged if they store tags
        label=int(get("label", -1)),
        masks=_masks_from_disk(get("masks", [])),
        crowd=np.asarray(get("crowd", []), bool),
        semantic=get("semantic", b""),
    )


def write_shard(path: str, records) -> None:
    writer = ArrayRecordWriter(path, "group_size:1")  # one record per chunk: cheap random access
    for record in records:
        writer.write(serialize(record))
    writer.close()


def write_shards(records, directory: str, num_shards: int, class_names=(), prefix: str = "data") -> list[str]:
    """Writes records round-robin into `num_shards` ArrayRecord files (and the class vocabulary)."""
    os.makedirs(directory, exist_ok=True)
    records = list(records)
    paths = [os.path.join(directory, f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record") for i in range(num_shards)]
    for i, path in enumerate(paths):
        write_shard(path, records[i::num_shards])
    write_class_names(directory, class_names)
    return paths


def write_class_names(directory: str, class_names) -> None:
    with open(os.path.join(directory, CLASS_NAMES_FILE), "w") as f:
        json.dump(list(class_names), f)


def read_class_names(directory: str) -> tuple[str, ...]:
    """The vocabulary beside a set of shards; () when there is none."""
    path = os.path.join(directory, CLASS_NAMES_FILE)
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        return tuple(json.load(f))


class ArrayRecordSource:
    """Random access over ArrayRecord shards (a glob or a list of paths) in the record schema."""

    def __init__(self, pattern: str | list[str]):
        paths = sorted(glob.glob(pattern)) if isinstance(pattern, str) else list(pattern)
        paths = [p for p in paths if os.path.basename(p) != CLASS_NAMES_FILE]  # "dir/*" matches it too
        if not paths:
            raise FileNotFoundError(f"array_record: no shards match {pattern!r}")
        self.paths = paths
        self.source = grain.sources.ArrayRecordDataSource(paths)
        self.class_names = read_class_names(os.path.dirname(paths[0]))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return deserialize(self.source[index], index)
