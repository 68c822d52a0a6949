"""transformers checkpoints: `CLIPModel` (OpenAI, LAION) and `SiglipModel` (SigLIP, SigLIP 2 without NaFlex)
folders as `save_pretrained` writes them, in both directions.

In: `hf:DIR` -> spec + parameters. Out: an export whose architecture one of the two families expresses
-> a folder `transformers.AutoModel.from_pretrained` (and `CLIPVisionModel` / `SiglipVisionModel`, what
multimodal LLMs load) reads with the same outputs. Only the two towers and the logit scale (and bias)
travel: region heads (Prompter, box head) have no place in those classes.
"""

import json
import math
import os
import sys

import numpy as np

from cloc_jax.models.spec import EVA_PE_KEYS, FAMILIES, ImageSpec, Spec, family_spec
from cloc_jax.models.vit import vit_size
from cloc_jax.tokenizers import _Transformers
from cloc_jax.weights import layout
from cloc_jax.weights.layout import Weights, conv, linear, same_in_both_towers

# transformers' hidden_act -> ours; "gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation.
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# transformers' `resample` (PIL's enum) <-> our interpolation names
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_NAMES = dict(
    ln1="layer_norm1", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2", q="self_attn.q_proj", k="self_attn.k_proj",
    v="self_attn.v_proj", out="self_attn.out_proj",
)  # fmt: skip


def _names(prefix: str) -> dict[str, str]:
    return {k: f"{prefix}.{v}" for k, v in _NAMES.items()}


def _read_state(directory: str) -> tuple[dict[str, np.ndarray], str]:
    """All weights of a save_pretrained folder (one safetensors file, sharded ones, or a torch pickle)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return layout.read_torch_weights(path), path
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(layout.read_torch_weights(os.path.join(directory, name)))
        return state, index
    raise FileNotFoundError(f"hf:{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _activation(cfg: dict, source: str) -> str:
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ValueError(
            f"{source}: hidden_act={cfg['hidden_act']!r} is not supported (use one of {sorted(ACTIVATIONS)})"
        )
    return ACTIVATIONS[cfg["hidden_act"]]


def read(directory: str) -> Weights:
    """`hf:DIR` -> Weights. The tokenizer and image-processor files of the folder come along."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"hf:{directory}: no config.json (not a transformers save_pretrained folder)")
    with open(config_path) as f:
        config = json.load(f)
    family = config.get("model_type")
    if family not in ("clip", "siglip"):
        raise ValueError(
            f"{config_path}: model_type={family!r}; hf: reads CLIPModel ('clip') and SiglipModel ('siglip')"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory).to_dict()  # with the class defaults filled in
    vision, text = config["vision_config"], config["text_config"]
    state, source = _read_state(directory)
    activation = same_in_both_towers("hidden_act", [_activation(vision, source), _activation(text, source)], source)
    ln_eps = same_in_both_towers("layer_norm_eps", [vision["layer_norm_eps"], text["layer_norm_eps"]], source)
    processor = {}
    if os.path.exists(os.path.join(directory, "preprocessor_config.json")):
        with open(os.path.join(directory, "preprocessor_config.json")) as f:
            processor = json.load(f)
    clip = family == "clip"
    preset = FAMILIES[f"hf_{family}"]
    patch, side = vision["patch_size"], vision["image_size"]
    image = dict(
        variant=f"hf/{patch}",
        width=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"],
        mlp_dim=vision["intermediate_size"],
        posemb_grid=side // patch,
        pixel_mean=tuple(processor.get("image_mean", preset["image"].get("pixel_mean", (0.5,) * 3))),
        pixel_std=tuple(processor.get("image_std", preset["image"].get("pixel_std", (0.5,) * 3))),
    )
    txt = dict(
        width=text["hidden_size"],
        depth=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        mlp_dim=text["intermediate_size"],
        vocab_size=text["vocab_size"],
    )
    embed_dim = config["projection_dim"] if clip else text.get("projection_size") or text["hidden_size"]
    context = text["max_position_embeddings"]
    tokenizer = dict(path=directory, context_length=context)
    if not clip:
        tokenizer["pad_id"] = text.get("pad_token_id", 1)  # SigLIP pads with its EOS and reads the padding
    model = dict(embed_dim=embed_dim, activation=activation, ln_eps=ln_eps)
    spec = family_spec(f"hf_{family}", image, txt, model, tokenizer, side, _preprocess(processor, source))
    return Weights(spec, _params(state, family, image, txt, source), source)


def _preprocess(processor: dict, source: str) -> dict:
    """preprocessor_config.json -> the spec's preprocess fields it sets (the family's preset fills the rest):
    a short-side resize + centre crop (its crop fraction = crop / short side) or a resize to height x width, and
    the resampling filter."""
    out = {}
    if "resample" in processor:
        if processor["resample"] not in RESAMPLE:
            raise ValueError(f"{source}: preprocessor resample={processor['resample']!r} is no PIL filter")
        out["interpolation"] = RESAMPLE[processor["resample"]]
    size, crop = processor.get("size") or {}, processor.get("crop_size")
    if isinstance(size, dict) and "shortest_edge" in size and processor.get("do_center_crop", True) and crop:
        side = crop["height"] if isinstance(crop, dict) else int(crop)
        out.update(resize="center_crop", crop_fraction=side / size["shortest_edge"])
    elif isinstance(size, dict) and "height" in size:
        out["resize"] = "squash"
    return out


def _processor(spec: Spec, family: str, side: int, mean: list, std: list):
    """The spec's preprocessing as the family's transformers image processor. A rule the class cannot express
    (a letterbox; a squash for CLIP, a crop for SigLIP) is written as the family's own rule, and said."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    rule = spec.preprocess
    resample = {name: key for key, name in RESAMPLE.items()}[rule.interpolation]
    wanted = "center_crop" if family == "clip" else "squash"
    if rule.resize != wanted or not rule.antialias:
        print(f"note: preprocess.resize={rule.resize!r} has no transformers {family} processor; wrote {wanted}",
              file=sys.stderr)  # fmt: skip
    common = dict(image_mean=mean, image_std=std, resample=resample)
    if family == "siglip":
        return SiglipImageProcessor(size={"height": side, "width": side}, **common)
    fraction = rule.crop_fraction if rule.resize == "center_crop" else 1.0
    short = math.floor(side / fraction + 1e-6)
    return CLIPImageProcessor(size={"shortest_edge": short}, crop_size={"height": side, "width": side}, **common)


def _params(state: dict, family: str, image: dict, text: dict, source: str) -> dict[str, np.ndarray]:
    used = set()

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise ValueError(f"{source}: missing parameter {name}")
        used.add(name)
        return np.asarray(state[name], np.float32)

    clip = family == "clip"
    v, t = "vision_model", "text_model"
    grid = image["posemb_grid"]
    out = {"image/patch_embed/kernel": conv(get(f"{v}.embeddings.patch_embedding.weight"))}
    posemb = get(f"{v}.embeddings.position_embedding.weight")
    if clip:  # the class token's position embedding is folded into the token: the two are always added
        out["image/cls"] = (get(f"{v}.embeddings.class_embedding") + posemb[0])[None, None]
        posemb = posemb[1:]
        out["image/ln_pre/scale"], out["image/ln_pre/bias"] = (
            get(f"{v}.pre_layrnorm.weight"),
            get(f"{v}.pre_layrnorm.bias"),
        )
        out["image/proj/kernel"] = linear(get("visual_projection.weight"))
        out["text/proj/kernel"] = linear(get("text_projection.weight"))
        out["log_scale"] = get("logit_scale").reshape(())
    else:
        out["image/patch_embed/bias"] = get(f"{v}.embeddings.patch_embedding.bias")
        out.update(_map_head_from_torch(get, f"{v}.head", image["heads"]))
        out["text/proj/kernel"], out["text/proj/bias"] = linear(get(f"{t}.head.weight")), get(f"{t}.head.bias")
        out["log_scale"], out["bias"] = get("logit_scale").reshape(()), get("logit_bias").reshape(())
    out["image/pos_embedding"] = posemb.reshape(grid, grid, -1)
    out["image/ln_post/scale"], out["image/ln_post/bias"] = (
        get(f"{v}.post_layernorm.weight"),
        get(f"{v}.post_layernorm.bias"),
    )
    out["text/token_embed/embedding"] = get(f"{t}.embeddings.token_embedding.weight")
    out["text/pos_embedding"] = get(f"{t}.embeddings.position_embedding.weight")
    out["text/ln_final/scale"], out["text/ln_final/bias"] = (
        get(f"{t}.final_layer_norm.weight"),
        get(f"{t}.final_layer_norm.bias"),
    )
    for tower, prefix, sizes in (("image", v, image), ("text", t, text)):
        for i in range(sizes["depth"]):
            names = _names(f"{prefix}.encoder.layers.{i}")
            out.update(layout.block_from_torch(get, f"{tower}/encoder/block_{i}", sizes["heads"], names))
    if extra := sorted(k for k in state if k not in used and "position_ids" not in k):  # (a buffer, not a weight)
        raise ValueError(f"{source}: unexpected parameter {extra[0]} for a {family} model")
    return out


def _map_head_from_torch(get, prefix: str, heads: int) -> dict[str, np.ndarray]:
    """transformers' MultiheadAttentionPoolingHead (nn.MultiheadAttention, fused in_proj) -> our MapHead."""
    names = dict(qkv=f"{prefix}.attention.in_proj", out=f"{prefix}.attention.out_proj", ln1=f"{prefix}.layernorm",
                 ln2=f"{prefix}.layernorm", fc1=f"{prefix}.mlp.fc1", fc2=f"{prefix}.mlp.fc2")  # fmt: skip
    block = layout.block_from_torch(get, "image/map_head", heads, names)
    out = {k.replace("image/map_head/ln1", "image/map_head/ln"): v for k, v in block.items() if "/ln2/" not in k}
    out["image/map_head/probe"] = get(f"{prefix}.probe")
    return out


def _torch_names(params: dict, family: str, image: dict, text: dict) -> dict[str, np.ndarray]:
    """Our parameters -> transformers' state dict (the inverse of `_params`)."""
    clip = family == "clip"
    v, t = "vision_model", "text_model"
    p = params
    out = {
        f"{v}.embeddings.patch_embedding.weight": np.ascontiguousarray(
            p["image/patch_embed/kernel"].transpose(3, 2, 0, 1)
        )
    }
    posemb = p["image/pos_embedding"].reshape(-1, p["image/pos_embedding"].shape[-1])
    if clip:
        out[f"{v}.embeddings.class_embedding"] = p["image/cls"].reshape(-1)
        posemb = np.concatenate([np.zeros_like(posemb[:1]), posemb])
        out[f"{v}.pre_layrnorm.weight"], out[f"{v}.pre_layrnorm.bias"] = p["image/ln_pre/scale"], p["image/ln_pre/bias"]
        out["visual_projection.weight"] = linear(p["image/proj/kernel"])
        out["text_projection.weight"] = linear(p["text/proj/kernel"])
        out["logit_scale"] = np.asarray(p["log_scale"]).reshape(())
    else:
        out[f"{v}.embeddings.patch_embedding.bias"] = p["image/patch_embed/bias"]
        names = dict(qkv=f"{v}.head.attention.in_proj", out=f"{v}.head.attention.out_proj", ln1=f"{v}.head.layernorm",
                     ln2=f"{v}.head.unused", fc1=f"{v}.head.mlp.fc1", fc2=f"{v}.head.mlp.fc2")  # fmt: skip
        head = {k: val for k, val in p.items() if k.startswith("image/map_head/")}
        head = {k.replace("image/map_head/ln/", "image/map_head/ln1/"): val for k, val in head.items()}
        head.update({k.replace("/ln1/", "/ln2/"): val for k, val in head.items() if "/ln1/" in k})
        out.update(
            {k: val for k, val in layout.block_to_torch(head, "image/map_head", names).items() if ".unused." not in k}
        )
        out[f"{v}.head.probe"] = p["image/map_head/probe"]
        out[f"{t}.head.weight"], out[f"{t}.head.bias"] = linear(p["text/proj/kernel"]), p["text/proj/bias"]
        out["logit_scale"], out["logit_bias"] = np.reshape(p["log_scale"], (1,)), np.reshape(p["bias"], (1,))
    out[f"{v}.embeddings.position_embedding.weight"] = posemb
    out[f"{v}.post_layernorm.weight"], out[f"{v}.post_layernorm.bias"] = (
        p["image/ln_post/scale"],
        p["image/ln_post/bias"],
    )
    for i in range(image["depth"]):
        out.update(layout.block_to_torch(p, f"image/encoder/block_{i}", _names(f"{v}.encoder.layers.{i}")))
    out[f"{t}.embeddings.token_embedding.weight"] = p["text/token_embed/embedding"]
    out[f"{t}.embeddings.position_embedding.weight"] = p["text/pos_embedding"]
    out[f"{t}.final_layer_norm.weight"], out[f"{t}.final_layer_norm.bias"] = (
        p["text/ln_final/scale"],
        p["text/ln_final/bias"],
    )
    for i in range(text["depth"]):
        out.update(layout.block_to_torch(p, f"text/encoder/block_{i}", _names(f"{t}.encoder.layers.{i}")))
    return out


# Keys of a family's preset that an export may set otherwise (the processor and resizing carry them).
_FREE = ("posemb_resize", "pixel_mean", "pixel_std")


def family_of(spec: Spec) -> str:
    """ "clip" or "siglip": the transformers class that expresses this architecture (its `FAMILIES` preset), or
    a one-line error naming the first setting it cannot express."""
    m, im = spec.model, spec.model.image
    common = {
        "model.image.cluster_ratio": (im.cluster_ratio, 0.0),
        "model.image.adapter_dim": (im.adapter_dim, 0),
        "model.image.proj_bias": (im.proj_bias, False),
    }
    defaults = ImageSpec()  # EVA-02's and PE's knobs: no transformers CLIP or SigLIP has them
    common.update({f"model.image.{k}": (getattr(im, k), getattr(defaults, k)) for k in EVA_PE_KEYS})
    for key, (have, want) in common.items():
        if have != want:
            raise ValueError(f"{key}={have!r} has no transformers equivalent (needs {want!r})")
    if m.activation not in HF_ACTIVATION:
        raise ValueError(f"model.activation={m.activation!r} has no transformers equivalent")
    family = "clip" if m.loss == "softmax" else "siglip"  # the loss decides: CLIP softmax, SigLIP sigmoid
    preset = FAMILIES[f"hf_{family}"]
    for part, tower in (("image", m.image), ("text", m.text)):
        for key, want in preset[part].items():
            if key not in _FREE and getattr(tower, key) != want:
                raise ValueError(
                    f"model.{part}.{key}={getattr(tower, key)!r}: a transformers {family} model needs {want!r}"
                )
    return family


def write(weights: Weights, tokenizer, out: str) -> str:
    """An export (spec + unrolled parameters, its tokenizer object) -> a transformers folder."""
    from safetensors.numpy import save_file
    from transformers import CLIPConfig, SiglipConfig

    family = family_of(weights.spec)
    spec = weights.spec.to_json()
    if not isinstance(tokenizer, _Transformers):
        raise ValueError(
            f"tokenizer.type={spec['tokenizer']['type']!r} has no transformers tokenizer (use hf, clip_bpe, open_clip)"
        )
    m, p = spec["model"], weights.in_layout(scan=False)
    im = m["image"]
    size = vit_size(im["variant"], im["width"], im["depth"], im["heads"], im["mlp_dim"])
    grid = p["image/pos_embedding"].shape[0]
    side = grid * size.patch
    tx = m["text"]
    act = HF_ACTIVATION[m["activation"]]
    text_config = dict(
        vocab_size=p["text/token_embed/embedding"].shape[0],
        hidden_size=tx["width"],
        intermediate_size=tx["mlp_dim"],
        num_hidden_layers=tx["depth"],
        num_attention_heads=tx["heads"],
        max_position_embeddings=p["text/pos_embedding"].shape[0],
        hidden_act=act,
        layer_norm_eps=m["ln_eps"],
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.tok.pad_token_id,
    )
    if tokenizer.tok.bos_token_id is not None:
        text_config["bos_token_id"] = tokenizer.tok.bos_token_id
    vision_config = dict(
        hidden_size=size.width,
        intermediate_size=size.mlp_dim,
        num_hidden_layers=size.depth,
        num_attention_heads=size.heads,
        image_size=side,
        patch_size=size.patch,
        hidden_act=act,
        layer_norm_eps=m["ln_eps"],
    )
    mean, std = list(im["pixel_mean"]), list(im["pixel_std"])
    if family == "clip":
        config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=m["embed_dim"])
    else:
        text_config["projection_size"] = p["text/proj/kernel"].shape[1]
        config = SiglipConfig(text_config=text_config, vision_config=vision_config)
    processor = _processor(weights.spec, family, side, mean, std)
    config.architectures = ["CLIPModel" if family == "clip" else "SiglipModel"]
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.tok.save_pretrained(out)
    image = dict(depth=size.depth, heads=size.heads, posemb_grid=grid)
    state = _torch_names(p, family, image, dict(depth=tx["depth"], heads=tx["heads"]))
    state = {k: np.array(v, np.float32, order="C") for k, v in state.items()}  # (ascontiguousarray makes 0-d 1-d)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out
