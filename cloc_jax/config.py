"""Shared config pieces. A config file is `get_config(arg)`; `arg` is "key=value,key=value".

Configs are locked: assigning a key that does not exist (in a file or with --config.x=y) is an error.
"""

import importlib.util
import os

import ml_collections

from cloc_jax import sharding
from cloc_jax.data import pipeline
from cloc_jax.models.spec import Spec

# Logical axis -> mesh axes, activations and parameters named apart (as MaxText does): activations
# [batch, length, embed] split the batch over data x fsdp and keep embed whole; parameters [embed, mlp] split
# embed over fsdp (ZeRO-3 style) and mlp over tensor.
AXIS_RULES = (
    ("activation_batch", sharding.BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("joint", None),
    ("layers", None),
)


# Class prompts phrased like the scenes' region captions ("large red circle"), averaged over sizes.
SCENE_TEMPLATES = ("large {}", "small {}")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """ "variant=L/14,batch_size=256" -> ConfigDict over `defaults`; values take the default's type."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config arg {item!r}: expected key=value with key in {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.image_size = Spec().image_size
    c.batch_size = 32_768
    c.num_steps = 439_087
    # The model's architecture and tokenizer: the spec's defaults (cloc_jax/models/spec.py documents each key).
    spec = Spec().to_config()
    c.model = spec["model"]
    c.tokenizer = spec["tokenizer"]
    c.preprocess = spec["preprocess"]  # how evaluation decodes and resizes images (CLOC's letterbox)
    # L = L_CLIP + weight * (images with regions / batch) * (L_region + grounding_weight * L_grounding)
    c.region_loss = dict(
        weight=1.0,
        filter_threshold=0.9,  # region texts more similar than this are not each other's negatives
        grounding="l2",  # the paper's L2; or "l1_giou"
        grounding_weight=1.0,
    )
    # UMG-CLIP tag supervision: image tags and region class labels embedded by the text tower, Smooth L1
    # (beta) between cosine similarity and the multi-hot target; 0 weights turn it off.
    c.tags = dict(image_weight=0.0, region_weight=0.0, beta=0.1)
    # Sources are spec strings (cloc_jax/data/sources.py): scenes, array_record:GLOB, tfds:NAME:SPLIT,
    # coco:ANN.json[,...]@IMAGE_DIR, webdataset:TARS, or a mixture "0.7*array_record:... + 0.3*scenes".
    c.data = dict(
        train="scenes:train",
        heldout="scenes:heldout",
        train_size=1_000_000,  # sizes of the embedded scenes splits (other sources have their own)
        heldout_size=1024,
        max_regions=4,  # M regions sampled per training image (the paper's default; M = 2 does about as well)
        referring_prob=0.5,  # chance a region's text is its referring expression instead of its caption
        # Training-time geometry: "pad" = long-side resize + pad (CLOC), "crop" = random resized crop
        # (CLIP; boxes keeping < min_visible of their area are dropped). A flip swaps left/right in the
        # texts ("swap") or is not done to images whose texts say left/right ("skip").
        augment=dict(resize="pad", crop_scale=(0.9, 1.0), min_visible=0.3, flip=0.0, flip_texts="swap"),
        masks=False,  # training rows carry region masks and a label map aligned with the image (dense losses)
        **pipeline.EVAL_DATA_DEFAULTS,  # seed, decoding threads, prefetch, regions and captions kept in evaluation
    )
    # LAMB is the default. The CLOC paper's AdamW is one flag away:
    #   --config.optim.name=adamw --config.optim.b2=0.98 --config.optim.lr=5e-4
    c.optim = dict(
        name="lamb",
        lr=5e-4,
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        weight_decay=0.2,
        warmup_steps=2000,
        end_lr_ratio=0.0,
        clip_norm=1.0,
        image_lr_mult=1.0,
        text_lr_mult=1.0,
        trainable=(),  # () trains everything; ("adapter", "map_head") trains only matching parameters
        accum_steps=1,  # > 1: the whole batch's exact gradient, this many micro-batches at a time (GradCache)
        # A step with a non-finite loss, gradient or update is skipped (counted as nonfinite/skipped_steps);
        # this many in a row stop the run with one line (0: never stop). Parameters never become NaN.
        max_nonfinite_steps=10,
    )
    # In-slice mesh (one axis may be -1 = the rest) x `slices` data-parallel copies over DCN.
    # max_fsdp > 0 caps fsdp: the factor of the devices beyond it goes to data parallelism.
    c.mesh = dict(sharding.DATA_PARALLEL)
    c.contrastive = "global"  # or "ring": chunked losses that never hold [B, B] logits on one device
    c.axis_rules = AXIS_RULES
    c.log_every = 100
    c.eval_every = 5000
    c.eval_batch_size = 256
    c.evals = dict(
        retrieval=eval_entry("retrieval", "heldout"),
        zeroshot=eval_entry("zeroshot", "heldout", templates=SCENE_TEMPLATES),
        region=eval_entry("region_classification", "heldout", templates=SCENE_TEMPLATES),
        region_crop=eval_entry("region_crop", "heldout", prefix="region", templates=SCENE_TEMPLATES),
        region_retrieval=eval_entry("region_retrieval", "heldout", prefix="region"),
        grounding=eval_entry("grounding", "heldout"),
        # training-free semantic segmentation (scenes: the shapes' classes and "background"), mIoU
        segmentation=eval_entry("semantic_segmentation", "heldout", templates=("{}",)),
    )
    c.init_from = ""  # an exported model (python -m cloc_jax.export) to start from, e.g. for adapter tuning
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    return c


def eval_entry(type_: str, data: str, **options) -> dict:
    """One evaluation (cloc_jax/evals/__init__.py): its type, its data (a split of `data` or a source spec),
    and every option with its default, so each can be set from the command line."""
    entry = dict(type=type_, data=data, prefix="", templates=("a {}",), classes="", present_only=False)
    entry.update(max_regions=0, max_captions=0)  # 0: data.eval_max_regions / data.eval_max_captions
    entry.update(image_size=0)  # the input's side in pixels (0: the model's; position embeddings follow the grid)
    # semantic segmentation: k x k windows of the model's size at half-window stride over a canvas of S (k + 1) / 2 px
    entry.update(slide=0)  # (0: the whole image at once)
    unknown = set(options) - set(entry)
    if unknown:
        raise ValueError(f"evaluation options {sorted(unknown)}; choose from {sorted(entry)}")
    return {**entry, **options}


# Class prompts for real data until a benchmark brings its own (CLIP's plain template).
PHOTO_TEMPLATES = ("a photo of a {}.",)
T5_VOCAB_SIZE = 32_000  # T5's SentencePiece (cc_en.32000): known without the file, so AOT needs none
DATA_ARGS = ("", "scenes")


def paper_config(
    variant: str, image_size: int, text: dict, embed_dim: int, data: str = "", init_from: str = ""
) -> ml_collections.ConfigDict:
    """The CLOC paper's pretraining recipe (batch 32,768, T5 tokenizer lowercased into 77 tokens, warmup 2k,
    cosine, wd 0.2), laid out for a pod: bf16 activations (f32 parameters and optimizer state), parameters
    and optimizer state sharded over every device (FSDP), matmul outputs saved for the backward pass (remat).

    For real data: `--config.data.train=SPEC` is required (and `data.heldout` for evaluation), and
    `--config.tokenizer.path` names T5's SentencePiece model (tokenizers.T5_SENTENCEPIECE). `data="scenes"`
    (`--config=configs/cloc_b16.py:data=scenes`) trains and evaluates on the embedded scenes instead, a
    smoke test. The paper trains with AdamW; LAMB is this framework's default (per-layer trust ratios,
    optim.py). The paper's optimizer: `--config.optim.name=adamw` (b1 0.9, b2 0.98, lr 5e-4 as here).

    With `init_from` (any `cloc_jax.load` source: open_clip:DIR for EVA-02-CLIP or PE-Core) the towers, their
    sizes and the tokenizer are the checkpoint's: the architecture keys stay at their defaults, to be adopted."""
    if data not in DATA_ARGS:
        raise ValueError(f"config arg data={data!r}: use data=scenes (the embedded scenes) or set --config.data.train")
    c = base_config()
    c.model.update(dtype="bfloat16", remat="dots_no_batch")
    # FSDP over every device up to 256, data parallel over the rest (4 x 256 on the paper's 1,024 chips):
    # 768-wide towers do not split 1,024 ways, and 256 pieces leave no array over 1 MiB whole on any device.
    c.mesh.update(data=1, fsdp=-1, max_fsdp=256)
    c.image_size = image_size
    if init_from:
        c.init_from = init_from
    else:
        c.model.image.variant = variant
        c.model.text.update(text)
        c.model.embed_dim = embed_dim
    if data != "scenes" and not init_from:
        c.model.text.vocab_size = T5_VOCAB_SIZE
        c.tokenizer.update(type="sentencepiece", path="")
    if data != "scenes":
        c.data.update(train="", heldout="")
        for name in ("zeroshot", "region", "region_crop", "segmentation"):
            c.evals[name].templates = PHOTO_TEMPLATES
    c.lock()
    return c


def clip_twin(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CLIP-only baseline of a CLOC config: same everything, no region extractor or region losses.

    Region classification and retrieval still run, through box-pooled tokens and through crops."""
    c.unlock()
    c.model.region_extractor = "none"
    del c.evals["grounding"]
    c.lock()
    return c


def umg(c: ml_collections.ConfigDict, cluster_ratio: float = 0.75) -> ml_collections.ConfigDict:
    """UMG-CLIP on top of a CLOC config: RoIAlign regions, token clustering after the 2nd layer (as
    AiluRus), image and region tag losses. From scratch (EVA-CLIP initialisation needs weight import).

    Two clustering choices are ours, for region quality (see the README's ablation): residual unfolding,
    and density from 2 nearest neighbours, so an object of two tokens can be a density peak."""
    c.unlock()
    c.model.region_extractor = "roi_align"
    c.model.image.update(cluster_ratio=cluster_ratio, cluster_layer=2, cluster_unfold="residual", cluster_knn=2)
    c.tags.update(image_weight=1.0, region_weight=1.0)
    del c.evals["grounding"]  # RoIAlign regions have no grounding head
    c.lock()
    return c


def set_dotted(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """{"model.image.cluster_ratio": 0.0, ...} -> those keys set (an unknown key is an error: locked)."""
    for key, value in overrides.items():
        *path, last = key.split(".")
        target = c
        for part in path:
            target = target[part]
        target[last] = value
    return c


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file by path (config files are not an importable package)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path).removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def backbone_config(directory: str, backbones: dict[str, str], name: str, arg: str) -> ml_collections.ConfigDict:
    """The pretraining config file `backbones[name]` in `directory`, with `arg`: what a dense adaptation config
    (`dense_adaptation`) starts from; an unknown name is one line."""
    if name not in backbones:
        raise ValueError(f"config arg backbone={name!r}; choose one of {sorted(backbones)}")
    return load_config_file(os.path.join(directory, backbones[name]), arg)


def dense_adaptation(c: ml_collections.ConfigDict, pet: bool, adapter_dim: int = 8) -> ml_collections.ConfigDict:
    """A pretraining config turned into UMG-CLIP's dense adaptation (`train/dense.py`): the backbone frozen, Convpass
    adapters in it with `pet`, a mask decoder trained on masked rows. Start it from an export (`init_from`). The
    decoder's defaults are a small FC-CLIP / Mask2Former: queries, width, layers, heads, MLP width."""
    c.unlock()
    c.model.image.update(cluster_ratio=0.0, adapter_dim=adapter_dim if pet else 0)  # the full token grid
    c.tags.update(image_weight=0.0, region_weight=0.0)  # the dense step has no tag losses
    c.data.masks = True
    c.optim.update(trainable=("decoder", "adapter") if pet else ("decoder",), image_lr_mult=1.0, text_lr_mult=1.0)
    c.dense = dict(
        num_queries=16,
        dim=128,
        layers=3,  # Mask2Former's 9 = 3 rounds over its 3 levels; here 1 round
        heads=4,
        mlp_dim=512,
        stuff_classes=(),  # label-map classes that are one region each, not instances (COCO's 53; scenes' background)
        unseen_classes=(),  # classes of the training data kept out of its vocabulary (open-vocabulary evaluation)
        num_classes=0,  # the training data's classes: only compiling ahead of time reads it (no data there)
        templates=("{}",),  # prompts of the class names
        loss=dict(classification=2.0, mask=5.0, dice=5.0, void=0.1),  # Mask2Former's weights
        alpha=0.4,  # FC-CLIP's ensemble: the out-of-vocabulary scores' weight for seen classes
        beta=0.8,  # ... and for unseen ones
        object_threshold=0.8,  # panoptic inference: a query's class score it needs to make a segment
        overlap_threshold=0.8,  # and the share of its mask it must keep against the others
    )
    c.evals = {}  # dense adaptation evaluates with evals/dense.py
    c.lock()
    return c
