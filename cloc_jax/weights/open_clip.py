"""open_clip's hub layout: `open_clip_config.json` + `open_clip_model.safetensors` (or
`open_clip_pytorch_model.bin`), in both directions, for its CLIPs with its own text transformer and either its
own ViT (`open_clip_vit.py`: the OpenAI and LAION ViT models) or a timm tower (`timm_towers.py`: EVA-02-CLIP,
PE-Core; `custom_text`, the text tower under `text.`).

In: `open_clip:DIR` -> spec + parameters. Out: an export with an open_clip tokenizer and an architecture one of
the two towers expresses -> a folder `open_clip.create_model("local-dir:DIR")` loads with the same outputs.
Every config key either maps onto our architecture or must keep the value with which open_clip computes what
we compute; anything else (attentional pooling, other timm or transformers towers, ...) is a one-line error
naming the key and the file. Only the two towers and the logit scale (and bias) travel.
"""

import filecmp
import importlib.util
import json
import os
import shutil

import numpy as np

from cloc_jax.models.spec import FAMILIES, Spec, family_spec
from cloc_jax.models.vit import vit_size
from cloc_jax.tokenizers import OpenClipTokenizer
from cloc_jax.weights import layout, open_clip_vit, timm_towers
from cloc_jax.weights.layout import Weights, linear, same_in_both_towers

CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BPE = "bpe_simple_vocab_16e6.txt.gz"
LN_EPS = 1e-5  # torch's (and open_clip's) LayerNorm default
# Keys of each config we read as architecture; `_FIXED` keys must keep one of the listed values (the first is
# open_clip's default); `_IGNORED` keys change nothing at inference or only matter when a `_FIXED` key is set.
_READ = {
    "model_cfg": {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_bias"},
    "vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "no_ln_pre",
                   "pool_type", "final_ln_after_pool", "act_kwargs", "norm_kwargs"},
    "text_cfg": {"context_length", "vocab_size", "tokenizer_kwargs", "width", "heads", "layers", "mlp_ratio",
                 "no_causal_mask", "pool_type", "proj_bias", "proj_type", "act_kwargs", "norm_kwargs"},
}  # fmt: skip
_CUSTOM_BLOCK = dict(
    qk_norm=(False,), scaled_cosine_attn=(False,), scale_heads=(False,), scale_attn_inner=(False,),
    scale_attn=(False,), scale_fc=(False,), block_type=(None, "default"),
)  # fmt: skip
_FIXED = {
    "model_cfg": {},
    "vision_cfg": dict(ls_init_value=(None,), attentional_pool=(False,), output_tokens=(False,),
                       timm_model_name=(None,), pos_embed_type=("learnable", "sin_cos_2d"), **_CUSTOM_BLOCK),
    "text_cfg": dict(ls_init_value=(None,), embed_cls=(False,), output_tokens=(False,), hf_model_name=(None,),
                     hf_tokenizer_name=(None, ""), **_CUSTOM_BLOCK),
}  # fmt: skip
_IGNORED = {
    "model_cfg": {"init_logit_scale", "nonscalar_logit_scale", "custom_text", "output_dict"},
    "vision_cfg": {"patch_dropout", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool",
                   "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"},
    "text_cfg": {"pad_id", "eos_id", "final_ln_after_pool", "tokenizer_mode", "hf_model_pretrained", "hf_proj_type",
                 "hf_pooler_type"},
}  # fmt: skip
TEXT_POOLS = {"argmax": "eot", "last": "last"}  # argmax = the EOT id (the highest) = our last non-padding token
# preprocess_cfg.resize_mode <-> our resize rules ("longest" pads centred where our letterbox pads right/bottom)
RESIZE_MODES = {"shortest": "center_crop", "squash": "squash", "longest": "letterbox"}


def _check_keys(cfg: dict, where: str, source: str) -> None:
    for key, value in cfg.items():
        if key in _READ[where] or key in _IGNORED[where]:
            continue
        if key not in _FIXED[where]:
            raise ValueError(f"{source}: {where}.{key} is not a setting of open_clip's ViT CLIP that cloc_jax reads")
        if value not in _FIXED[where][key]:
            needs = " or ".join(map(repr, _FIXED[where][key]))
            raise ValueError(f"{source}: {where}.{key}={value!r} has no cloc_jax equivalent (needs {needs})")


def _activation(quick_gelu: bool, kwargs: dict | None, where: str, source: str) -> str:
    """open_clip's act_layer (QuickGELU or nn.GELU, with act_kwargs) -> our name."""
    rest = dict(kwargs or {})
    approximate = rest.pop("approximate", "none")
    if rest or approximate not in ("none", "tanh") or (quick_gelu and kwargs):
        raise ValueError(f"{source}: {where}.act_kwargs={kwargs!r} (quick_gelu={quick_gelu}) has no cloc_jax twin")
    return "quick_gelu" if quick_gelu else {"none": "gelu", "tanh": "gelu_tanh"}[approximate]


def _eps(kwargs: dict | None, where: str, source: str) -> float:
    kwargs = dict(kwargs or {})
    eps = kwargs.pop("eps", LN_EPS)
    if kwargs:
        raise ValueError(f"{source}: {where}.norm_kwargs={kwargs!r}: cloc_jax's LayerNorm only takes eps")
    return float(eps)


def _architecture(config: dict, source: str) -> Spec:
    """open_clip_config.json -> our spec (without the tokenizer's path); one-line errors for what we cannot
    express."""
    if "model_cfg" not in config:
        raise ValueError(f"{source}: no model_cfg")
    cfg = config["model_cfg"]
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    timm = bool(vision.get("timm_model_name"))
    for part, where in ((cfg, "model_cfg"), (vision, "vision_cfg"), (text, "text_cfg")):
        if not (timm and where == "vision_cfg"):  # a timm tower's keys are timm_towers.image_spec's to check
            _check_keys(part, where, source)
    if isinstance(vision.get("layers", 12), list | tuple):
        raise ValueError(f"{source}: vision_cfg.layers={vision['layers']!r} is a ModifiedResNet; cloc_jax reads ViTs")
    pool = vision.get("pool_type", "tok")
    if pool != "tok":  # "avg" averages the patch tokens of a ViT that has a class token: our "gap" has none
        raise ValueError(f"{source}: vision_cfg.pool_type={pool!r} has no cloc_jax equivalent (needs 'tok'; 'avg' "
                         "averages beside a class token, which cloc_jax's gap pool does not have)")  # fmt: skip
    if text.get("pool_type", "argmax") not in TEXT_POOLS:
        raise ValueError(f"{source}: text_cfg.pool_type={text['pool_type']!r}: cloc_jax reads {sorted(TEXT_POOLS)}")
    if text.get("proj_type", "linear") == "none" or not cfg.get("embed_dim", 512):
        raise ValueError(f"{source}: text_cfg.proj_type='none' (or model_cfg.embed_dim=0): cloc_jax's towers project")
    extra = set(text.get("tokenizer_kwargs") or {}) - {"clean"}
    if extra:
        raise ValueError(f"{source}: text_cfg.tokenizer_kwargs.{sorted(extra)[0]} has no cloc_jax equivalent")
    quick = bool(cfg.get("quick_gelu", False))
    preprocess = config.get("preprocess_cfg", {})
    if timm:  # the timm model's own activations and norms; the text tower's are the model's
        family, image, side = timm_towers.image_spec(vision, source)
        activation = _activation(quick, text.get("act_kwargs"), "text_cfg", source)
        ln_eps = _eps(text.get("norm_kwargs"), "text_cfg", source)
    else:
        family, image, side = open_clip_vit.image_spec(vision, source)
        towers = ((vision, "vision_cfg"), (text, "text_cfg"))
        activation = same_in_both_towers(
            "act_kwargs", [_activation(quick, c.get("act_kwargs"), w, source) for c, w in towers], source
        )
        ln_eps = same_in_both_towers(
            "norm_kwargs.eps", [_eps(c.get("norm_kwargs"), w, source) for c, w in towers], source
        )
    preset = FAMILIES[family]["image"]
    image["pixel_mean"] = tuple(float(v) for v in preprocess.get("mean", preset["pixel_mean"]))
    image["pixel_std"] = tuple(float(v) for v in preprocess.get("std", preset["pixel_std"]))
    txt_width = int(text.get("width", 512))
    txt = dict(
        width=txt_width,
        depth=int(text.get("layers", 12)),
        heads=int(text.get("heads", 8)),
        mlp_dim=int(txt_width * text.get("mlp_ratio", 4.0)),
        causal=not text.get("no_causal_mask", False),
        pool=TEXT_POOLS[text.get("pool_type", "argmax")],
        proj_bias=bool(text.get("proj_bias", False)),
        vocab_size=int(text.get("vocab_size", 49408)),
    )
    model = dict(
        embed_dim=int(cfg.get("embed_dim", 512)),
        loss="softmax" if cfg.get("init_logit_bias") is None else "sigmoid",
        activation=activation,
        ln_eps=ln_eps,
    )
    context, clean = int(text.get("context_length", 77)), (text.get("tokenizer_kwargs") or {}).get("clean", "lower")
    rule = {}
    if preprocess.get("resize_mode", "shortest") not in RESIZE_MODES:
        raise ValueError(f"{source}: preprocess_cfg.resize_mode={preprocess['resize_mode']!r}; cloc_jax reads "
                         f"{sorted(RESIZE_MODES)}")  # fmt: skip
    rule["resize"] = RESIZE_MODES[preprocess.get("resize_mode", "shortest")]
    if preprocess.get("interpolation", "bicubic") != "random":  # "random" is a training setting
        rule["interpolation"] = preprocess.get("interpolation", "bicubic")
    tokenizer = dict(clean=clean, context_length=context)
    return family_spec(family, image, txt, model, tokenizer, image_size=side, preprocess=rule)


def default_bpe() -> str | None:
    """The installed open_clip's BPE merges file, found without importing open_clip (and torch)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(folder, BPE)):
            return os.path.join(folder, BPE)
    return None


def _bpe(directory: str) -> str:
    """The folder's own merges file if it has one, else the installed open_clip's."""
    names = sorted(f for f in os.listdir(directory) if f.endswith(".txt.gz"))
    if names:
        return os.path.join(directory, BPE if BPE in names else names[0])
    if path := default_bpe():
        return path
    raise FileNotFoundError(
        f"open_clip:{directory}: no BPE merges file ({BPE}) in the folder and open_clip is not installed: "
        "pip install open_clip_torch, or copy that file from open_clip's src/open_clip/ into the folder"
    )


def read(directory: str) -> Weights:
    """`open_clip:DIR` -> Weights. The tokenizer is open_clip's SimpleTokenizer (its BPE file from the folder
    or the installed open_clip)."""
    config_path = os.path.join(directory, CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"open_clip:{directory}: no {CONFIG} (not an open_clip hub folder)")
    with open(config_path) as f:
        architecture = _architecture(json.load(f), config_path)
    names = [os.path.join(directory, name) for name in WEIGHTS]
    source = next((path for path in names if os.path.exists(path)), None)
    if source is None:
        raise FileNotFoundError(f"open_clip:{directory}: {CONFIG} but no weights ({' or '.join(WEIGHTS)})")
    state = {k.removeprefix("module."): v for k, v in layout.read_torch_weights(source).items()}
    spec = architecture.replace(**{"tokenizer.path": _bpe(directory)})
    t = "text." if any(k.startswith("text.") for k in state) else ""  # CustomTextCLIP nests the text tower
    fields = spec.to_json()
    _check_state(state, _torch_shapes(fields, t), source)
    return Weights(spec, _params(state, fields["model"]["image"], fields["model"]["text"], t), source)


def _torch_shapes(spec: dict, t: str = "") -> dict[str, tuple[int, ...]]:
    """The state dict (names -> shapes) open_clip's CLIP with this architecture has."""
    m, context = spec["model"], spec["tokenizer"]["context_length"]
    im, tx, embed = m["image"], m["text"], m["embed_dim"]
    shapes = _tower(im).torch_shapes(im, embed)
    w = tx["width"]
    shapes.update({f"{t}token_embedding.weight": (tx["vocab_size"], w), f"{t}positional_embedding": (context, w)})
    shapes.update({f"{t}ln_final.weight": (w,), f"{t}ln_final.bias": (w,)})
    if tx["proj_bias"]:
        shapes.update({f"{t}text_projection.weight": (embed, w), f"{t}text_projection.bias": (embed,)})
    else:
        shapes[f"{t}text_projection"] = (w, embed)
    for i in range(tx["depth"]):
        shapes.update(open_clip_vit.block_shapes(f"{t}transformer.resblocks.{i}", w, tx["mlp_dim"]))
    shapes["logit_scale"] = ()
    if m["loss"] == "sigmoid":
        shapes["logit_bias"] = ()
    return shapes


def _check_state(state: dict, shapes: dict, source: str) -> None:
    """Every parameter open_clip_config.json implies is there with its shape, and nothing else."""
    have = {name: np.shape(value) for name, value in state.items()}
    have.update({n: () for n, v in state.items() if n.startswith("logit_") and np.size(v) == 1})  # [] or [1]
    layout.check_shapes(have, shapes, source)


def _tower(image: dict):
    """The module that maps this image tower: `timm_towers` for a spec read from a timm tower (its variant says
    so), else `open_clip_vit`."""
    return timm_towers if image["variant"].startswith("timm/") else open_clip_vit


def _params(state: dict, image: dict, text: dict, t: str) -> dict[str, np.ndarray]:
    get = lambda name: np.asarray(state[name], np.float32)  # noqa: E731  (names checked by _check_state)
    out = _tower(image).params(state, image)
    out.update(_text_params(get, text, t))
    out["log_scale"] = get("logit_scale").reshape(())
    if "logit_bias" in state:
        out["bias"] = get("logit_bias").reshape(())
    return out


def _text_params(get, text: dict, t: str) -> dict[str, np.ndarray]:
    out = {"text/token_embed/embedding": get(f"{t}token_embedding.weight")}
    out["text/pos_embedding"] = get(f"{t}positional_embedding")
    out["text/ln_final/scale"], out["text/ln_final/bias"] = get(f"{t}ln_final.weight"), get(f"{t}ln_final.bias")
    if text["proj_bias"]:  # an nn.Linear [E, D]
        out["text/proj/kernel"] = linear(get(f"{t}text_projection.weight"))
        out["text/proj/bias"] = get(f"{t}text_projection.bias")
    else:  # a parameter [D, E], used as x @ proj
        out["text/proj/kernel"] = get(f"{t}text_projection")
    for i in range(text["depth"]):
        names = open_clip_vit.block_names(f"{t}transformer.resblocks.{i}")
        out.update(layout.block_from_torch(get, f"text/encoder/block_{i}", text["heads"], names))
    return out


def _torch_state(p: dict, image: dict, text: dict) -> dict[str, np.ndarray]:
    """Our parameters -> open_clip's state dict (the inverse of `_params`): CLIP's, or CustomTextCLIP's (the text
    tower under `text.`) beside a timm tower."""
    tower = _tower(image)
    out, t = tower.state(p, image), ("text." if tower is timm_towers else "")
    out[f"{t}token_embedding.weight"] = p["text/token_embed/embedding"]
    out[f"{t}positional_embedding"] = p["text/pos_embedding"]
    out[f"{t}ln_final.weight"], out[f"{t}ln_final.bias"] = p["text/ln_final/scale"], p["text/ln_final/bias"]
    if text["proj_bias"]:
        out[f"{t}text_projection.weight"] = linear(p["text/proj/kernel"])
        out[f"{t}text_projection.bias"] = p["text/proj/bias"]
    else:
        out[f"{t}text_projection"] = p["text/proj/kernel"]
    for i in range(text["depth"]):
        names = open_clip_vit.block_names(f"{t}transformer.resblocks.{i}")
        out.update(layout.block_to_torch(p, f"text/encoder/block_{i}", names))
    out["logit_scale"] = np.reshape(p["log_scale"], ())
    if "bias" in p:
        out["logit_bias"] = np.reshape(p["bias"], ())
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def model_config(spec: Spec, params: dict) -> dict:
    """Spec -> open_clip's model_cfg, or a one-line error naming the first setting open_clip's ViT CLIP (with
    its SimpleTokenizer) cannot express."""
    fields = spec.to_json()
    m, tok = fields["model"], fields["tokenizer"]
    im, tx = m["image"], m["text"]
    size = vit_size(im["variant"], im["width"], im["depth"], im["heads"], im["mlp_dim"])
    grid = params["image/pos_embedding"].shape[0]
    timm = timm_towers.name_of(spec.model.image, grid * size.patch)
    needs = {
        "model.image.cluster_ratio": (im["cluster_ratio"], (0.0,)),
        "model.image.adapter_dim": (im["adapter_dim"], (0,)),
        "model.text.pool": (tx["pool"], tuple(TEXT_POOLS.values())),
        "model.activation": (m["activation"], ("quick_gelu", "gelu", "gelu_tanh")),
        "tokenizer.type": (tok["type"], ("open_clip",)),  # argmax pooling needs EOT to be the highest id
        "tokenizer.pad_id": (tok.get("pad_id", 0), (0,)),
    }
    for key, (have, want) in needs.items():
        if have not in want:
            raise ValueError(f"{key}={have!r} has no open_clip equivalent (needs one of {want})")
    act = dict(act_kwargs={"approximate": "tanh"}) if m["activation"] == "gelu_tanh" else {}
    norm = dict(norm_kwargs={"eps": m["ln_eps"]}) if m["ln_eps"] != LN_EPS else {}
    vision = timm_towers.vision_config(timm) if timm else open_clip_vit.vision_config(im, size, grid, {**act, **norm})
    text = dict(
        context_length=params["text/pos_embedding"].shape[0],
        vocab_size=params["text/token_embed/embedding"].shape[0],
        width=tx["width"],
        heads=tx["heads"],
        layers=tx["depth"],
        mlp_ratio=open_clip_vit.mlp_ratio(tx["width"], tx["mlp_dim"]),
        **act,
        **norm,
    )
    if tx["pool"] == "last":
        text["pool_type"] = "last"
    if not tx["causal"]:
        text["no_causal_mask"] = True
    if tx["proj_bias"]:
        text["proj_bias"] = True
    if tok.get("clean", "lower") != "lower":
        text["tokenizer_kwargs"] = {"clean": tok["clean"]}
    cfg = dict(embed_dim=m["embed_dim"], quick_gelu=m["activation"] == "quick_gelu", vision_cfg=vision, text_cfg=text)
    if timm:
        cfg["custom_text"] = True  # open_clip's CustomTextCLIP, as its EVA-02 and PE configs say
    if m["loss"] == "sigmoid":
        cfg["init_logit_bias"] = float(params["bias"])
    return cfg


def write(weights: Weights, tokenizer, out: str) -> str:
    """An export (spec + unrolled parameters, its tokenizer object) -> an open_clip hub folder. A BPE file other
    than open_clip's own is copied in (our reader prefers it; open_clip's get_tokenizer needs
    tokenizer_kwargs bpe_path for it)."""
    from safetensors.numpy import save_file

    cfg = model_config(weights.spec, weights.in_layout(scan=False))
    spec, p = weights.spec.to_json(), weights.in_layout(scan=False)
    if not isinstance(tokenizer, OpenClipTokenizer):
        raise ValueError(f"tokenizer.type={spec['tokenizer']['type']!r} has no open_clip equivalent (needs open_clip)")
    im = spec["model"]["image"]
    rule = weights.spec.preprocess
    preprocess = dict(size=cfg["vision_cfg"]["image_size"], mean=list(im["pixel_mean"]), std=list(im["pixel_std"]))
    preprocess.update(
        interpolation=rule.interpolation, resize_mode={v: k for k, v in RESIZE_MODES.items()}[rule.resize]
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(dict(model_cfg=cfg, preprocess_cfg=preprocess), f, indent=2)
    save_file(_torch_state(p, im, spec["model"]["text"]), os.path.join(out, WEIGHTS[0]), metadata={"format": "pt"})
    bpe, default = spec["tokenizer"]["path"], default_bpe()
    target = os.path.join(out, os.path.basename(bpe))
    if not (default and filecmp.cmp(bpe, default, shallow=False)) and os.path.abspath(bpe) != os.path.abspath(target):
        shutil.copy(bpe, target)
    return out
