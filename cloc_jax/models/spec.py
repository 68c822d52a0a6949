"""The model contract: typed, frozen specs of what determines a model's parameters and meaning.

A `Spec` is the model part of a config (`config.model`, `config.image_size`, `config.tokenizer`), the JSON every
checkpoint and export carries, and what every importer fills. Its field defaults are the only defaults of the
architecture: `config.base_config` takes them from here, and a file saved before a field existed reads that
field's default, which keeps the old behaviour. `FAMILIES` says once what each imported checkpoint family is.
Building a model, its example batch and its parameter shapes from a spec is `models/build.py`.
"""

import dataclasses
import filecmp
import json
import os
from typing import Any

import flax

# jnp dtype names the activations may take; parameters and optimizer state stay float32.
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """The ViT image tower (`models/vit.py`). Defaults are big_vision's ViT; the knobs after `adapter_dim`
    let imported CLIP, SigLIP and open_clip towers compute what they compute in their own libraries."""

    variant: str = "B/16"  # "<name>/<patch>", sizes from vit.VARIANTS (or all four of width..mlp_dim)
    pool: str = "map"  # "map" (attention pooling), "cls" (class token), "gap" (mean of the tokens)
    cluster_ratio: float = 0.0  # > 0: UMG-CLIP token clustering merges that fraction of tokens after cluster_layer
    cluster_layer: int = 2
    cluster_unfold: str = "copy"  # or "residual": own features at the clustering point + the cluster's update
    cluster_spatial: float = 0.0  # weight of grid distance beside feature distance (AiluRus); 0: features only
    cluster_knn: int = 5  # neighbours that make a token's density (DPC-kNN's 5)
    adapter_dim: int = 0  # > 0: Convpass adapters in every block (PET; train them with optim.trainable)
    width: int = 0  # nonzero: overrides the variant's size
    depth: int = 0
    heads: int = 0
    mlp_dim: int = 0
    ln_pre: bool = True
    patch_bias: bool = True
    project: bool = True  # False: the pooled features are the embedding (SigLIP's image tower)
    proj_bias: bool = False
    posemb_grid: int = 0  # 0: image_size / patch
    posemb_resize: str = "bilinear"  # "bicubic" (transformers, open_clip), "zoom" (big_vision), "bicubic_antialias"
    pixel_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # the checkpoint's normalisation of [0, 1] pixels
    pixel_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # EVA-02's and Perception Encoder's departures (timm's names in brackets; models/layers.BlockVariant)
    class_token: bool = False  # a class token beside a "map" or "gap" pool (PE keeps one; its MAP head reads it)
    ln_eps: float = 0.0  # the image tower's LayerNorm epsilon; 0: model.ln_eps (EVA-02's towers differ)
    mlp: str = "standard"  # or "swiglu" [swiglu_mlp]
    mlp_norm: bool = False  # a LayerNorm on the MLP's hidden units [scale_mlp]
    attn_norm: bool = False  # a LayerNorm on the heads' output before the out projection [scale_attn_inner]
    key_bias: bool = True  # False: no key bias (EVA-02's q_bias and v_bias only)
    layer_scale: bool = False  # per-channel gains on both residual branches [init_values]
    rope_grid: int = 0  # > 0: 2D rotary embeddings, positions rescaled to this reference grid [ref_feat_shape]
    rope_offset: float = 0.0  # added to each cell index before rescaling [rope_grid_offset]
    rope_order: str = "yx"  # "yx" (row first) [rope_grid_indexing='ij'] or "xy" (PE)
    rope_temperature: float = 10000.0
    map_heads: int = 0  # the MAP head's heads; 0: the tower's [attn_pool_num_heads]


# ImageSpec keys only EVA-02 and PE set: a writer of another family needs them at their defaults
EVA_PE_KEYS = ("class_token", "ln_eps", "mlp", "mlp_norm", "attn_norm", "key_bias", "layer_scale", "rope_grid",
               "map_heads")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """The text tower (`models/text.py`): causal + "eot" is CLIP's; SigLIP's is bidirectional, pooled "last"."""

    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    causal: bool = True
    pool: str = "eot"
    proj_bias: bool = False
    vocab_size: int = 0  # 0: the tokenizer's (padded) size


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Both towers, what they share, the contrastive loss's parameters and the region head."""

    image: ImageSpec = ImageSpec()
    text: TextSpec = TextSpec()
    embed_dim: int = 512
    activation: str = "gelu_tanh"  # "gelu" (exact, open_clip's LAION models) or "quick_gelu" (OpenAI CLIP)
    ln_eps: float = 1e-6
    max_logit_scale: float = 100.0  # 0: no clamp (imported SigLIP and CLIP keep their learned scale)
    loss: str = "softmax"  # or "sigmoid" (SigLIP, adds a learnable bias)
    dtype: str = "float32"  # activation dtype
    scan: bool = True
    remat: str = "none"
    # encoder attention kernel: "auto" = Pallas splash on TPU, cuDNN on GPU (bf16/fp16), XLA elsewhere;
    # or "xla", "cudnn", "splash" (models/attention.py)
    attention: str = "auto"
    region_extractor: str = "prompter"  # a region head of models/heads.py: "prompter", "roi_align", "none"


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer and the text lengths. Region captions and referring expressions are short: a shorter
    region context keeps them cheap; `region_pack_length` > 0 packs an image's region texts end to end into one
    row that long for training (regions that would not fit are dropped and counted)."""

    type: str = "bytes"  # tokenizers.TYPES
    path: str = ""
    lowercase: bool = True
    context_length: int = 77
    region_context_length: int = 16
    region_pack_length: int = 0
    pad_id: int = 0  # what `tokenize` pads with (imported SigLIP pads with its EOS)
    clean: str = "lower"  # open_clip's text cleaning


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How an image file becomes the model's [S, S, 3] input when it is evaluated, embedded or asked a question
    (`data/preprocess.py`): the checkpoint family's own rule, so numbers compare with the published ones. Models
    trained here record CLOC's letterbox (training's own geometry is `config.data.augment`)."""

    resize: str = "letterbox"  # "letterbox" (long side, pad), "center_crop" (short side, centre), "squash"
    crop_fraction: float = 1.0  # center_crop: the short side goes to S / crop_fraction (timm's crop_pct)
    crop_offset: str = "floor"  # center_crop's (H - S) / 2: "floor" (transformers) or "round" (torchvision)
    interpolation: str = "bicubic"  # PIL's filter: "bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"
    antialias: bool = True  # False: tf.image.resize's point-sampled bilinear (big_vision)
    alpha: str = "grey"  # transparency composited over "grey" (128) or "white" (transformers), or "drop"ped


@dataclasses.dataclass(frozen=True)
class Spec:
    model: ModelSpec = ModelSpec()
    image_size: int = 224
    tokenizer: TokenizerSpec = TokenizerSpec()
    preprocess: PreprocessSpec = PreprocessSpec()

    def to_json(self) -> dict:
        """JSON-normalised nested dict (tuples become lists): what files hold."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_config(self) -> dict:
        """Nested dict with tuples kept: what `config.model` / `config.tokenizer` hold."""
        return dataclasses.asdict(self)

    def replace(self, **dotted) -> "Spec":
        """A copy with dotted keys set: `spec.replace(**{"model.scan": False})`."""
        return from_dict(flax.traverse_util.unflatten_dict({**flat(self.to_json()), **dotted}, sep="."))


def _build(cls, values: dict, where: str):
    """A spec dataclass from a nested dict: missing fields take their defaults, lists become tuples, an unknown
    key is one line (a file written by a newer cloc_jax, or a typo)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(values) - set(fields)):
        raise ValueError(f"spec key {where}{unknown[0]} is unknown (choose from {sorted(fields)})")
    out = {}
    for name, value in values.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            value = value if isinstance(value, type(default)) else _build(type(default), value, f"{where}{name}.")
        elif isinstance(default, tuple):
            value = tuple(value)
        out[name] = value
    return cls(**out)


def from_dict(spec: dict | Spec) -> Spec:
    """A nested dict (a file's JSON, a config's model part) -> Spec; a Spec passes through. A file written before
    specs held their preprocessing gets its family's rule where the family shows (`family_preprocess`)."""
    if isinstance(spec, Spec):
        return spec
    spec = dict(spec)
    if "preprocess" not in spec:
        spec["preprocess"] = family_preprocess(spec)
    return _build(Spec, spec, "")


def from_config(config) -> Spec:
    """A training config's model part -> Spec."""
    return from_dict(
        dict(
            model=config.model.to_dict(),
            image_size=config.image_size,
            tokenizer=config.tokenizer,
            preprocess=config.preprocess,
        )
    )


def flat(tree: dict) -> dict:
    return flax.traverse_util.flatten_dict(tree, sep=".")


# Keys that change only how a model runs (memory, speed, batch layout), not its parameters or what they
# compute: a run resumes with other values (with the mesh, which is not in the spec at all).
_PREPROCESS_KEYS = tuple(f"preprocess.{f.name}" for f in dataclasses.fields(PreprocessSpec))
LAYOUT_KEYS = ("model.remat", "model.dtype", "model.attention", "tokenizer.region_pack_length", *_PREPROCESS_KEYS)

# Keys that belong to how a run trains, not to what the weights mean: a run started from a checkpoint keeps
# its own (a CLOC run adds its region heads to an imported CLIP; it may scan, remat or cast differently).
TRAINING_KEYS = (
    "model.region_extractor",
    "model.dtype",
    "model.scan",
    "model.remat",
    "model.attention",
    "model.max_logit_scale",
    "model.image.cluster_ratio",
    "model.image.cluster_layer",
    "model.image.cluster_unfold",
    "model.image.cluster_spatial",
    "model.image.cluster_knn",
    "model.image.adapter_dim",
    "tokenizer.region_context_length",
    "tokenizer.region_pack_length",
    *_PREPROCESS_KEYS,  # a run records its own evaluation geometry (CLOC's letterbox), whatever it started from
)


def mismatch(saved: Spec, current: Spec, ignore: tuple[str, ...] = ()) -> str | None:
    """First differing key of two specs, outside `ignore`, as `key: saved != current`, or None."""
    saved, current = flat(saved.to_json()), flat(current.to_json())
    for key in sorted(set(saved) | set(current)):
        if key not in ignore and saved.get(key) != current.get(key):
            return f"{key}: {saved.get(key)!r} != {current.get(key)!r}"
    return None


def same_files(a: str, b: str) -> bool:
    """Two vocabulary paths (files or folders) with the same contents."""
    if not (a and b and os.path.exists(a) and os.path.exists(b)):
        return False
    if os.path.isdir(a) != os.path.isdir(b):
        return False
    if not os.path.isdir(a):
        return filecmp.cmp(a, b, shallow=False)
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(same_files(os.path.join(a, n), os.path.join(b, n)) for n in names)


def architecture_overrides(current: Spec, saved: Spec, source: str) -> dict[str, Any]:
    """The architecture keys (model and tokenizer, not image_size or TRAINING_KEYS) a config must take from the
    checkpoint `saved` it starts from, as {dotted key: value}. A key `current` sets to something else than both
    the default and the checkpoint is a one-line error naming it: the config asks for another model."""
    defaults, saved_flat, current_flat = flat(Spec().to_json()), flat(saved.to_json()), flat(current.to_json())
    if not saved.model.image.posemb_grid and saved.image_size != current.image_size:
        # the checkpoint's position table is its own grid (image_size / patch): a run at another size resizes it
        patch = int(saved.model.image.variant.partition("/")[2])
        saved_flat["model.image.posemb_grid"] = saved.image_size // patch
    out = {}
    for key, value in saved_flat.items():
        if key == "image_size" or key in TRAINING_KEYS or current_flat.get(key) == value:
            continue
        if key == "tokenizer.path" and same_files(current_flat.get(key), value):
            continue  # the same vocabulary in another place (an export keeps a copy)
        if current_flat.get(key) != defaults.get(key):
            raise ValueError(
                f"init_from={source}: {key}={current_flat.get(key)!r} disagrees with the checkpoint's {value!r} "
                "(architecture keys come from the checkpoint; drop the override)"
            )
        out[key] = tuple(value) if isinstance(value, list) else value
    context = out.get("tokenizer.context_length", current.tokenizer.context_length)
    if current.tokenizer.region_context_length > context:
        out["tokenizer.region_context_length"] = context
    return out


# What each imported checkpoint family is, said once: the architecture keys its converters do not read from the
# file (a converter adds the sizes it reads). Region heads never travel: imports are CLIP-only models.
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_CLIP_IMAGE = dict(pool="cls", ln_pre=True, patch_bias=False, project=True, posemb_resize="bicubic")
_CLIP_TEXT = dict(causal=True, pool="eot", proj_bias=False)
_SIGLIP_TEXT = dict(causal=False, pool="last", proj_bias=True)
_IMPORTED = dict(region_extractor="none", max_logit_scale=0.0)
FAMILIES = {
    # transformers' CLIPModel (OpenAI, LAION)
    "hf_clip": dict(
        image=dict(_CLIP_IMAGE, pixel_mean=OPENAI_MEAN, pixel_std=OPENAI_STD),
        text=_CLIP_TEXT,
        model=dict(_IMPORTED, loss="softmax"),
        tokenizer=dict(type="hf", lowercase=False, pad_id=0),
        preprocess=dict(resize="center_crop", interpolation="bicubic", crop_offset="floor", alpha="white"),
    ),
    # transformers' SiglipModel (SigLIP, SigLIP 2 without NaFlex): no ln_pre, no image projection
    "hf_siglip": dict(
        image=dict(pool="map", ln_pre=False, patch_bias=True, project=False, posemb_resize="bicubic"),
        text=_SIGLIP_TEXT,
        model=dict(_IMPORTED, loss="sigmoid"),
        tokenizer=dict(type="hf", lowercase=False),
        preprocess=dict(resize="squash", interpolation="bicubic", alpha="white"),  # the class default; files say
    ),
    # open_clip's VisionTransformer + TextTransformer (OpenAI and LAION ViT models)
    "open_clip": dict(
        image=dict(_CLIP_IMAGE, pixel_mean=OPENAI_MEAN, pixel_std=OPENAI_STD),
        text=_CLIP_TEXT,
        model=dict(_IMPORTED),
        tokenizer=dict(type="open_clip", lowercase=False, pad_id=0),
        # torchvision on PIL images: Resize(S) + CenterCrop(S), its offset rounded; convert("RGB") drops alpha
        preprocess=dict(resize="center_crop", interpolation="bicubic", crop_offset="round", alpha="drop"),
    ),
    # big_vision's SigLIP (.npz): MAP head, [-1, 1] pixels as they are, scipy zoom for position embeddings
    "big_vision_siglip": dict(
        image=dict(pool="map", ln_pre=False, patch_bias=True, posemb_resize="zoom", pixel_mean=(0.5,) * 3,
                   pixel_std=(0.5,) * 3),
        text=_SIGLIP_TEXT,
        model=dict(_IMPORTED, loss="sigmoid", activation="gelu_tanh", ln_eps=1e-6),
        tokenizer=dict(),
        # pp "decode|resize(S)": tf.image.resize bilinear without antialiasing; decode_jpeg(channels=3)
        preprocess=dict(resize="squash", interpolation="bilinear", antialias=False, alpha="drop"),
    ),
    # open_clip with a timm EVA-02 image tower (eva02_*_clip_*; EVA-CLIP, UMG-CLIP's initialisation): SwiGLU with
    # a sub-LayerNorm, a LayerNorm before the attention's out projection, no key bias, rotary positions on a 16 x 16
    # reference grid (class token not rotated), the class token pooled, timm's head (with bias) as projection
    "eva02_clip": dict(
        image=dict(_CLIP_IMAGE, patch_bias=True, proj_bias=True, ln_pre=False, ln_eps=1e-6, mlp="swiglu",
                   mlp_norm=True, attn_norm=True, key_bias=False, rope_order="yx", posemb_resize="bicubic_antialias",
                   pixel_mean=OPENAI_MEAN, pixel_std=OPENAI_STD),
        text=_CLIP_TEXT,
        model=dict(_IMPORTED),
        tokenizer=dict(type="open_clip", lowercase=False, pad_id=0),
        preprocess=dict(resize="center_crop", interpolation="bicubic", crop_offset="round", alpha="drop"),
    ),
    # open_clip with a timm Perception Encoder image tower (vit_pe_core_*): a class token and an 8-head attention
    # pool over every token, ln_pre, no patch bias, rotary positions (x first, cells counted from 1)
    "pe_core": dict(
        image=dict(pool="map", class_token=True, ln_pre=True, patch_bias=False, project=True, proj_bias=True,
                   posemb_resize="bicubic_antialias", ln_eps=1e-5, rope_order="xy", rope_offset=1.0, map_heads=8,
                   pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3),
        text=_CLIP_TEXT,
        model=dict(_IMPORTED),
        tokenizer=dict(type="open_clip", lowercase=False, pad_id=0),
        preprocess=dict(resize="squash", interpolation="bilinear", alpha="drop"),
    ),
}  # fmt: skip


def family_spec(
    family: str, image: dict, text: dict, model: dict, tokenizer: dict, image_size: int, preprocess: dict | None = None
) -> Spec:
    """A spec of an imported checkpoint: the family's fixed keys plus what the converter read from the file
    (which wins where both say). The region text context never exceeds the checkpoint's context."""
    preset = FAMILIES[family]
    tok = {**preset["tokenizer"], **tokenizer}
    tok.setdefault("region_context_length", min(TokenizerSpec.region_context_length, tok["context_length"]))
    return from_dict(
        dict(
            model=dict(preset["model"], **model, image={**preset["image"], **image}, text={**preset["text"], **text}),
            image_size=image_size,
            tokenizer=tok,
            preprocess={**preset["preprocess"], **(preprocess or {})},
        )
    )


def family_preprocess(spec: dict) -> dict:
    """The evaluation preprocessing of a spec file written before specs held it: its family's rule when the
    importer's marks show the family (variant "hf/P" with the loss telling CLIP from SigLIP, "open_clip/P",
    big_vision's "zoom" position-embedding resize), else CLOC's letterbox, which is what cloc_jax applied to every
    model then (so a model trained here keeps its numbers, and an imported one gets its library's pixels)."""
    model = spec.get("model", {})
    image = model.get("image", {})
    variant, loss = image.get("variant", ""), model.get("loss", "softmax")
    if variant.startswith("hf/"):
        return dict(FAMILIES["hf_clip" if loss == "softmax" else "hf_siglip"]["preprocess"])
    if variant.startswith("open_clip/"):
        return dict(FAMILIES["open_clip"]["preprocess"])
    if image.get("posemb_resize") == "zoom":
        return dict(FAMILIES["big_vision_siglip"]["preprocess"])
    return {}
