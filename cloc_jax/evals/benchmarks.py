"""The standard benchmarks under their standard protocols, and the suites `python -m cloc_jax.evaluate` runs.

Each benchmark is an evaluation entry (`config.eval_entry`) whose data defaults to where tfds keeps it;
`--data.<benchmark>=SPEC` points it anywhere the data layer reads (COCO-format files, Karpathy's JSON).
"""

import functools
import json
import os

from cloc_jax.config import PHOTO_TEMPLATES, SCENE_TEMPLATES, eval_entry


@functools.cache
def _imagenet() -> dict:
    """OpenAI's ImageNet-1k class names (in tfds's label order) and prompt templates, shipped as data."""
    with open(os.path.join(os.path.dirname(__file__), "imagenet.json")) as f:
        return json.load(f)


def imagenet_templates(kind: str = "openai") -> tuple[str, ...]:
    """OpenAI's 80 templates ("openai") or the short 7-template set ("simple")."""
    return tuple(_imagenet()[f"templates_{kind}"])


def class_names(classes: str, source_names) -> tuple[str, ...]:
    """An entry's `classes` ("" = the data source's own; "imagenet" = ImageNet-1k's 1,000 names)."""
    if classes == "imagenet":
        return tuple(_imagenet()["classes"])
    if classes:
        raise ValueError(f"classes={classes!r}; use '' (the data source's class names) or 'imagenet'")
    if not source_names:
        raise ValueError("this evaluation needs class names and its data source has none; set classes=imagenet")
    return tuple(source_names)


def _imagenet_entry(data: str, present_only: bool = False) -> dict:
    return eval_entry("zeroshot", data, classes="imagenet", templates=imagenet_templates(), present_only=present_only)


def _regions(data: str, max_regions: int) -> dict:
    return eval_entry("region_classification", data, templates=PHOTO_TEMPLATES, max_regions=max_regions)


def _semantic(data: str = "") -> dict:
    """Training-free semantic segmentation with OpenAI's 80 templates per class (MaskCLIP's prompts)."""
    return eval_entry("semantic_segmentation", data, templates=imagenet_templates())


UNC_SPLITS = (("val", "validation"), ("testA", "testA"), ("testB", "testB"))  # RefCOCO, RefCOCO+
UMD_SPLITS = (("val", "validation"), ("test", "test"))  # RefCOCOg


def _refcoco(config: str, split: str) -> dict:
    return eval_entry("grounding", f"tfds:ref_coco/{config}:{split}", max_regions=32)  # expressions per image


BENCHMARKS = {
    # zero-shot top-1/top-5, 80 prompts per class; A and R among the 200 classes they hold
    "imagenet": _imagenet_entry("tfds:imagenet2012:validation"),
    "imagenet_v2": _imagenet_entry("tfds:imagenet_v2:test"),
    "imagenet_a": _imagenet_entry("tfds:imagenet_a:test", present_only=True),
    "imagenet_r": _imagenet_entry("tfds:imagenet_r:test", present_only=True),
    "imagenet_sketch": _imagenet_entry("tfds:imagenet_sketch:test"),
    # image<->text R@1/5/10 over every caption of Karpathy's test splits (COCO 5k, Flickr30k 1k)
    "coco_retrieval": eval_entry("retrieval", ""),
    "flickr30k_retrieval": eval_entry("retrieval", ""),
    # region classification on ground-truth boxes, mAcc over classes (CLOC's protocol); the caps are
    # COCO's and LVIS's own per-image detection limits, and boxes beyond them are counted
    "coco_regions": _regions("", max_regions=100),
    "lvis_regions": _regions("tfds:lvis:validation", max_regions=300),
    # region<->text R@1/R@10 on any COCO-format set whose box annotations carry a caption (GRIT-style)
    "grit_regions": eval_entry("region_retrieval", "", max_regions=100),
    # grounding Acc@0.5, one sample per referring expression
    **{f"refcoco_{name}": _refcoco("refcoco_unc", split) for name, split in UNC_SPLITS},
    **{f"refcoco+_{name}": _refcoco("refcocoplus_unc", split) for name, split in UNC_SPLITS},
    **{f"refcocog_{name}": _refcoco("refcocog_umd", split) for name, split in UMD_SPLITS},
    # semantic segmentation mIoU (training-free from dense outputs; at each label map's own resolution)
    **{name: _semantic() for name in ("ade150", "ade847", "pc59", "pc459", "voc", "cocostuff")},
    # panoptic quality, for models with panoptic output
    "coco_panoptic": eval_entry("panoptic", ""),
    "ade_panoptic": eval_entry("panoptic", ""),
    # the embedded scenes' held-out split (size 1,024 unless scenes:heldout:N): what training evaluates
    "scenes_retrieval": eval_entry("retrieval", "scenes:heldout"),
    "scenes_zeroshot": eval_entry("zeroshot", "scenes:heldout", templates=SCENE_TEMPLATES),
    "scenes_regions": eval_entry("region_classification", "scenes:heldout", templates=SCENE_TEMPLATES),
    "scenes_region_crop": eval_entry("region_crop", "scenes:heldout", templates=SCENE_TEMPLATES),
    "scenes_region_retrieval": eval_entry("region_retrieval", "scenes:heldout"),
    "scenes_grounding": eval_entry("grounding", "scenes:heldout"),
    "scenes_segmentation": eval_entry("semantic_segmentation", "scenes:heldout", templates=("{}",)),
}

# Where the benchmarks without a tfds default find their data (tfds's coco and coco_captions builders
# need TensorFlow; their files do not).
DATA_EXAMPLES = {
    "coco_retrieval": "karpathy:/data/dataset_coco.json:test@/data/coco  (or tfds:coco_captions:test)",
    "flickr30k_retrieval": "karpathy:/data/dataset_flickr30k.json:test@/data/flickr30k/images",
    "coco_regions": "coco:/data/coco/annotations/instances_val2017.json@/data/coco/val2017",
    "grit_regions": "coco:/data/grit/region_captions.json@/data/grit/images",
    "ade150": "semseg:ade150:/data/ADEChallengeData2016",
    "ade847": "semseg:ade847:/data/ADE20K_2021_17_01",
    "pc59": "semseg:pc59:/data/VOCdevkit/VOC2010",
    "pc459": "semseg:pc459:/data/VOCdevkit/VOC2010",
    "voc": "semseg:voc:/data/VOCdevkit/VOC2012",
    "cocostuff": "semseg:cocostuff:/data/coco",
    "coco_panoptic": "coco_panoptic:/data/coco/annotations/panoptic_val2017.json@/data/coco/val2017",
    "ade_panoptic": "coco_panoptic:/data/ade/ade20k_panoptic_val.json@/data/ade/images/validation  (ade: ADEChallenge"
    "Data2016 with Mask2Former's prepare_ade20k_pan_seg.py output)",
}

# CLOC's Table 2 (zero-shot): the columns these benchmarks give, as (column, metric).
PAPER_COLUMNS = (
    ("COCO i2t R@1", "coco_retrieval/i2t_r1"),
    ("COCO t2i R@1", "coco_retrieval/t2i_r1"),
    ("ImageNet top-1", "imagenet/top1"),
    ("GRIT r2t R@10", "grit_regions/r2t_r10"),
    ("GRIT t2r R@10", "grit_regions/t2r_r10"),
    ("COCO mAcc", "coco_regions/macc"),
    ("LVIS mAcc", "lvis_regions/macc"),
)

SUITES = {
    "imagenet": ("imagenet", "imagenet_v2", "imagenet_a", "imagenet_r", "imagenet_sketch"),
    "retrieval": ("coco_retrieval", "flickr30k_retrieval"),
    "regions": ("coco_regions", "lvis_regions", "grit_regions"),
    "refcoco": tuple(name for name in BENCHMARKS if name.startswith("refcoco")),
    "paper": tuple(dict.fromkeys(metric.split("/")[0] for _, metric in PAPER_COLUMNS)),
    "seg": ("ade150", "ade847", "pc59", "pc459", "voc", "cocostuff", "coco_panoptic", "ade_panoptic"),
    "scenes": tuple(name for name in BENCHMARKS if name.startswith("scenes")),
    "all": tuple(name for name in BENCHMARKS if not name.startswith("scenes")),
}
