"""Data sources behind one interface: `len(source)`, `source[i] -> record` (records.py), `class_names`.

A source is named by a spec string, so a command line can point anywhere:

    scenes[:split[:size]]                       the embedded dataset (split: train | heldout)
    array_record:/data/train-*.array_record     shards in the record schema (records.py)
    tfds:ref_coco/refcoco_unc:train             tfds.data_source (coco_captions, ref_coco, lvis)
    coco:ANN.json[,ANN.json...]@IMAGE_DIR        COCO-format captions/instances/LVIS/RefCOCO files
    karpathy:dataset_coco.json:test@IMAGE_DIR    Karpathy's caption splits (COCO 5k, Flickr30k 1k test)
    webdataset:/data/{00000..00099}.tar         WebDataset tars: an image + a JSON per key
    semseg:ade150:/data/ADEChallengeData2016    a semantic-segmentation benchmark in its layout (segmentation.py)
    coco_panoptic:PANOPTIC.json@IMAGE_DIR       COCO panoptic segments and PNGs (masks, crowds, label maps)
    0.7*array_record:/a/*.array_record + 0.3*scenes   a weighted mixture of any of the above
"""

import os
import re

import grain
import numpy as np

from cloc_jax.data import coco, karpathy, segmentation, webdataset
from cloc_jax.data.records import ArrayRecordSource, empty_record
from cloc_jax.data.scenes import Scenes


def _tfds_record(example: dict, index: int, names: tuple) -> dict:
    """A tfds example of a classification set (imagenet2012 and its variants: `label`) or of coco,
    coco_captions, ref_coco or lvis (`objects`) -> record. tfds boxes are (ymin, xmin, ymax, xmax);
    per-object fields are cut to their shortest length (mock data does not align them)."""
    record = empty_record(index, example["image"])
    if "label" in example:  # an image class
        record["label"] = int(example["label"]) if 0 <= int(example["label"]) < len(names) else -1
    objects = example.get("objects", {})
    bbox = np.asarray(objects.get("bbox", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    labels = np.asarray(objects.get("label", np.zeros((0,))), np.int64).reshape(-1)
    refexp = objects.get("refexp", {}).get("raw")
    n = min(len(bbox), len(labels), len(refexp) if refexp is not None else len(bbox))
    labels = np.where((labels[:n] >= 0) & (labels[:n] < len(names)), labels[:n], -1)
    record["boxes"] = bbox[:n][:, [1, 0, 3, 2]]
    record["region_labels"] = labels.astype(np.int32)
    if refexp is not None:  # every expression of each box (RefCOCO scores each one)
        record["referring"] = [[_text(t) for t in np.asarray(r).reshape(-1)] for r in refexp[:n]]
    else:
        record["referring"] = [[] for _ in range(n)]
    # ref_coco labels are bare COCO category ids: its regions are named by their first referring expression
    first = [r[0] if r else "" for r in record["referring"]]
    record["region_texts"] = [names[i] if i >= 0 else r for i, r in zip(labels, first)]
    captions = example.get("captions", {}).get("text")
    record["captions"] = [_text(c) for c in np.asarray(captions).reshape(-1)] if captions is not None else []
    record["tags"] = np.unique(labels[labels >= 0]).astype(np.int32)
    record["has_tags"] = bool(names) and "objects" in example  # ref_coco's bare category ids name no class
    return record


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """`tfds.data_source(name, split)` (random access, no TensorFlow graph) adapted to records. Never
    downloads: a dataset that is not prepared is a FileNotFoundError saying so."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds

        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except (KeyError, NotImplementedError) as error:  # no splits generated / not random-access files
            if isinstance(error, NotImplementedError) and tfds.builder(name, data_dir=data_dir or None).is_prepared():
                raise ValueError(
                    f"tfds {name} is prepared as TFRecord; random access needs ArrayRecord: "
                    f"tfds build {name.split('/')[0]} --file_format=array_record"
                ) from None
            where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
            raise FileNotFoundError(
                f"tfds {name}:{split} is not prepared under {where} (tfds build {name.split('/')[0]}; "
                "some need a manual download)"
            ) from None
        except tfds.core.DatasetNotFoundError as error:
            raise FileNotFoundError(f"tfds has no dataset {name!r}: {error}") from None
        except ModuleNotFoundError as error:  # tfds's coco and coco_captions builders import TensorFlow
            raise ValueError(
                f"tfds:{name} needs {error.name or 'TensorFlow'} installed; or read its files (coco:, karpathy:)"
            ) from None
        features = self.source.dataset_info.features
        label = features["label"] if "label" in features else features["objects"]["label"]
        self.class_names = tuple(getattr(label, "names", ()))  # a ClassLabel (coco, lvis) or bare ids

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return _tfds_record(self.source[index], index, self.class_names)


class Mixture:
    """Weighted mixture of sources (grain's `MapDataset.mix`), with one class vocabulary: the union of
    theirs in order, every source's label and tag indices remapped into it. Each record keeps its own source's
    `has_tags`, so an untagged source's images are not taken for images without tags. The label maps' classes are the
    class names followed by the segmentation-only ones (the scenes' background); a record carries its source's
    `semantic_remap` into them, applied only where its label map is decoded (`masks.decode_semantic`)."""

    def __init__(self, sources: list, weights: list[float]):
        names = _union(s.class_names for s in sources)
        self.class_names = tuple(names)
        self.segmentation_classes = tuple(_union([names, *(segmentation_classes(s) for s in sources)]))
        remaps = [_indices(s.class_names, names) for s in sources]
        pixel_remaps = [_indices(segmentation_classes(s), self.segmentation_classes) for s in sources]
        parts = [grain.MapDataset.source(s).map(self._remapper(r, p)) for s, r, p in zip(sources, remaps, pixel_remaps)]
        self.dataset = grain.MapDataset.mix(parts, weights)

    @staticmethod
    def _remapper(remap: np.ndarray, pixel_remap: np.ndarray):
        def apply(record: dict) -> dict:
            record = dict(record)
            for key in ("region_labels", "tags"):
                record[key] = remap[np.asarray(record[key], np.int64)]
            record["label"] = int(remap[int(record["label"])])
            record["semantic_remap"] = pixel_remap  # applied where the label map is decoded, if it ever is
            return record

        return apply

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return dict(self.dataset[index], index=index)


def _union(vocabularies) -> list[str]:
    names: list[str] = []
    for vocabulary in vocabularies:
        names += [n for n in vocabulary if n not in names]
    return names


def _indices(names, into) -> np.ndarray:
    """Each of `names`' position in `into`, and -1 -> -1 (the last entry)."""
    return np.asarray([*(list(into).index(n) for n in names), -1], np.int32)


def segmentation_classes(source) -> tuple[str, ...]:
    """The classes a source's label maps index: its `segmentation_classes` where they differ from `class_names` (the
    scenes' background), else its class names."""
    return tuple(getattr(source, "segmentation_classes", source.class_names))


def from_spec(spec: str, image_size: int, scenes_size: int = 1024, seed: int = 0):
    """A source from its spec string (module docstring); a bad spec is a one-line error."""
    spec = spec.strip()
    if "+" in spec:
        weights, parts = [], []
        for term in spec.split("+"):
            match = re.fullmatch(r"\s*([0-9.]+)\s*\*\s*(\S.*?)\s*", term)
            if not match:
                raise ValueError(f"data source mixture term {term!r}: expected weight*spec, e.g. 0.3*scenes")
            weights.append(float(match.group(1)))
            parts.append(from_spec(match.group(2), image_size, scenes_size, seed))
        return Mixture(parts, weights)
    kind, _, rest = spec.partition(":")
    if kind == "scenes":
        split, _, size = rest.partition(":")
        if size and not size.isdigit():
            raise ValueError(f"data source {spec!r}: expected scenes:SPLIT[:SIZE]")
        return Scenes(split or "train", size=int(size or scenes_size), image_size=image_size, seed=seed)
    if kind == "array_record":
        return ArrayRecordSource(rest)
    if kind == "tfds":
        name, _, split = rest.rpartition(":")
        if not name:
            raise ValueError(f"data source {spec!r}: expected tfds:NAME:SPLIT")
        return TfdsSource(name, split)
    if kind == "coco":
        files, sep, image_dir = rest.rpartition("@")
        if not sep:
            raise ValueError(f"data source {spec!r}: expected coco:ANN.json[,ANN.json]@IMAGE_DIR")
        return coco.CocoSource(files.split(","), image_dir)
    if kind == "karpathy":
        files, sep, image_dir = rest.rpartition("@")
        path, colon, split = files.rpartition(":")
        if not sep or not colon:
            raise ValueError(f"data source {spec!r}: expected karpathy:DATASET.json:SPLIT@IMAGE_DIR")
        return karpathy.KarpathySource(path, split, image_dir)
    if kind == "webdataset":
        return webdataset.WebDatasetSource(rest)
    if kind == "semseg":
        layout, colon, root = rest.partition(":")
        if not colon or not root:
            raise ValueError(
                f"data source {spec!r}: expected semseg:LAYOUT:ROOT, LAYOUT one of {sorted(segmentation.LAYOUTS)}"
            )
        return segmentation.SemanticFolder(layout, root)
    if kind == "coco_panoptic":
        path, *dirs = rest.split("@")
        if len(dirs) not in (1, 2):
            raise ValueError(f"data source {spec!r}: expected coco_panoptic:PANOPTIC.json@IMAGE_DIR[@PNG_DIR]")
        return segmentation.PanopticSource(path, *dirs)
    kinds = "scenes, array_record, tfds, coco, karpathy, webdataset, semseg, coco_panoptic"
    raise ValueError(f"data source {spec!r}: unknown kind {kind!r} ({kinds})")
