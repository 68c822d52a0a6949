"""Small on-disk datasets in every supported format, made from embedded scenes (so their truth is known)."""

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

from cloc_jax.data import preprocess, records, transforms
from cloc_jax.data.scenes import CLASS_NAMES, Scenes


def scene_records(n: int, image_size: int = 48, split: str = "train") -> list[dict]:
    """Scenes as records with PNG-encoded images (lossless: decoded pixels equal the scene's)."""
    source = Scenes(split, size=n, image_size=image_size)
    out = []
    for i in range(n):
        record = source[i]
        out.append(dict(record, image=transforms.encode_image(record["image"])))
    return out


def write_array_record(directory: str, recs: list[dict], num_shards: int = 2) -> str:
    records.write_shards(recs, directory, num_shards, CLASS_NAMES)
    return os.path.join(directory, "*.array_record")


def write_coco(directory: str, recs: list[dict], region_captions: bool = False, ref_splits=("train",)) -> str:
    """captions + instances + RefCOCO refs JSON and an image folder; returns the `coco:` spec. With
    `region_captions` each box annotation carries "region <its text>"; refs cycle through `ref_splits`."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    images, captions, instances, refs = [], [], [], []
    for r in recs:
        h, w = preprocess.decode(r["image"]).shape[:2]
        name = f"{r['index']:06d}.png"
        with open(os.path.join(directory, "images", name), "wb") as f:
            f.write(r["image"])
        images.append(dict(id=int(r["index"]) + 100, file_name=name, width=w, height=h))
        captions += [dict(id=len(captions), image_id=int(r["index"]) + 100, caption=c) for c in r["captions"]]
        for k, (box, label, referring) in enumerate(zip(r["boxes"], r["region_labels"], r["referring"])):
            x0, y0, x1, y1 = (box * [w, h, w, h]).tolist()
            ann = dict(id=len(instances) + 7, image_id=int(r["index"]) + 100, category_id=int(label) + 1)
            instances.append(dict(ann, bbox=[x0, y0, x1 - x0, y1 - y0]))
            if region_captions:
                instances[-1]["caption"] = f"region {r['region_texts'][k]}"
            split = ref_splits[k % len(ref_splits)]
            refs.append(dict(ann_id=ann["id"], split=split, sentences=[dict(sent=referring)]))
    categories = [dict(id=i + 1, name=n) for i, n in enumerate(CLASS_NAMES)]
    files = {
        "captions.json": dict(images=images, annotations=captions),
        "instances.json": dict(images=images, annotations=instances, categories=categories),
        "refs.json": refs,
    }
    for name, content in files.items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f)
    anns = ",".join(os.path.join(directory, n) for n in files)
    return f"coco:{anns}@{os.path.join(directory, 'images')}"


def five_captions(record: dict) -> list[str]:
    return [f"{record['captions'][0]} ({k})" for k in range(5)]


def write_karpathy(directory: str, recs: list[dict], test) -> str:
    """Karpathy's `dataset_coco.json` layout (images under `filepath/`, five sentences each) with the records
    at positions `test` in the test split and the rest in train; returns the `karpathy:...:test@DIR` spec."""
    os.makedirs(os.path.join(directory, "val2014"), exist_ok=True)
    images = []
    for i, r in enumerate(recs):
        name = f"COCO_val2014_{i:012d}.png"
        with open(os.path.join(directory, "val2014", name), "wb") as f:
            f.write(r["image"])
        sentences = [dict(raw=c, tokens=c.split()) for c in five_captions(r)]
        split = "test" if i in test else "train"
        images.append(dict(filepath="val2014", filename=name, imgid=i, split=split, sentences=sentences, cocoid=i))
    path = os.path.join(directory, "dataset_coco.json")
    with open(path, "w") as f:
        json.dump(dict(images=images, dataset="coco"), f)
    return f"karpathy:{path}:test@{directory}"


def coco_captions_only(coco_spec: str) -> str:
    """The spec of `write_coco`'s captions file alone: captions and no instances, so no tags."""
    files, _, images = coco_spec.removeprefix("coco:").rpartition("@")
    return f"coco:{files.split(',')[0]}@{images}"


def write_webdataset(
    directory: str, recs: list[dict], per_shard: int = 4, pixel_boxes: bool = False, tags: bool = True
) -> str:
    """Tar shards of `<key>.png` + `<key>.json` (without a `tags` key unless `tags`); returns the
    `webdataset:` spec (a brace range)."""
    os.makedirs(directory, exist_ok=True)
    shards = [recs[i : i + per_shard] for i in range(0, len(recs), per_shard)]
    for s, shard in enumerate(shards):
        with tarfile.open(os.path.join(directory, f"shard-{s:04d}.tar"), "w") as tar:
            for r in shard:
                h, w = preprocess.decode(r["image"]).shape[:2]
                scale = np.array([w, h, w, h]) if pixel_boxes else np.ones(4)
                meta = dict(
                    captions=r["captions"],
                    regions=[
                        dict(bbox=(b * scale).tolist(), caption=t, referring=f)
                        for b, t, f in zip(r["boxes"], r["region_texts"], r["referring"])
                    ],
                )
                if tags:
                    meta["tags"] = [CLASS_NAMES[t] for t in r["tags"]]
                for ext, payload in (("png", r["image"]), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"sample{r['index']:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    records.write_class_names(directory, CLASS_NAMES)
    return f"webdataset:{directory}/shard-{{0000..{len(shards) - 1:04d}}}.tar"


def huge_png_header(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG whose header claims width x height (its pixel data is a 1x1 image's)."""
    small = io.BytesIO()
    Image.new("RGB", (1, 1)).save(small, "PNG")
    data = bytearray(small.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    body = bytes(data[12 : ihdr + 13])  # chunk type + 13 bytes of IHDR data
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(body))
    return bytes(data)


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()
