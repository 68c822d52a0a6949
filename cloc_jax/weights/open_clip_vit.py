"""open_clip's own transformer: its `VisionTransformer` image tower (OpenAI and LAION ViT CLIPs) and the
resblocks its text tower shares. The same four functions as `timm_towers` (the other image towers open_clip
holds), so `open_clip.py` picks one and keeps the hub layout, the text tower and the tokenizer."""

import numpy as np

from cloc_jax.models.spec import EVA_PE_KEYS, ImageSpec
from cloc_jax.weights import layout
from cloc_jax.weights.layout import conv

_OWN = dict(pool=("cls",), patch_bias=(False,), project=(True,), proj_bias=(False,))


def _square(value, key: str, source: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"{source}: vision_cfg.{key}={value!r}: cloc_jax's ViT is square")
        value = value[0]
    return int(value)


def image_spec(vision: dict, source: str) -> tuple[str, dict, int]:
    """open_clip's ViT's vision_cfg -> (family, image spec keys, image size)."""
    width, patch = int(vision.get("width", 768)), _square(vision.get("patch_size", 16), "patch_size", source)
    side = _square(vision.get("image_size", 224), "image_size", source)
    heads = width // int(vision.get("head_width", 64))
    if not heads or side % patch:
        raise ValueError(f"{source}: vision_cfg: width {width} / head_width or image_size {side} / patch {patch}")
    image = dict(
        variant=f"open_clip/{patch}",
        width=width,
        depth=int(vision.get("layers", 12)),
        heads=heads,
        mlp_dim=int(width * vision.get("mlp_ratio", 4.0)),
        ln_pre=not vision.get("no_ln_pre", False),
        posemb_grid=side // patch,
    )
    return "open_clip", image, side


def norms(image: dict) -> tuple[str, ...]:
    return ("ln_pre", "ln_post") if image["ln_pre"] else ("ln_post",)  # same names in both libraries


def block_shapes(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """One resblock's state dict (names -> shapes), image or text."""
    shapes = {f"{prefix}.{ln}.{p}": (width,) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")}
    shapes.update({f"{prefix}.attn.in_proj_weight": (3 * width, width), f"{prefix}.attn.in_proj_bias": (3 * width,)})
    shapes.update({f"{prefix}.attn.out_proj.weight": (width, width), f"{prefix}.attn.out_proj.bias": (width,)})
    shapes.update({f"{prefix}.mlp.c_fc.weight": (mlp, width), f"{prefix}.mlp.c_fc.bias": (mlp,)})
    shapes.update({f"{prefix}.mlp.c_proj.weight": (width, mlp), f"{prefix}.mlp.c_proj.bias": (width,)})
    return shapes


def block_names(prefix: str) -> dict[str, str]:
    """One resblock's torch names in `layout.block_from_torch`'s terms."""
    return dict(ln1=f"{prefix}.ln_1", ln2=f"{prefix}.ln_2", fc1=f"{prefix}.mlp.c_fc", fc2=f"{prefix}.mlp.c_proj",
                qkv=f"{prefix}.attn.in_proj", out=f"{prefix}.attn.out_proj")  # fmt: skip


def torch_shapes(image: dict, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """The `visual.*` state dict (names -> shapes) open_clip's ViT of this image spec has."""
    w, grid, patch = image["width"], image["posemb_grid"], int(image["variant"].partition("/")[2])
    shapes = {"visual.conv1.weight": (w, 3, patch, patch), "visual.class_embedding": (w,)}
    shapes.update({"visual.positional_embedding": (grid * grid + 1, w), "visual.proj": (w, embed_dim)})
    shapes.update({f"visual.{ln}.{p}": (w,) for ln in norms(image) for p in ("weight", "bias")})
    for i in range(image["depth"]):
        shapes.update(block_shapes(f"visual.transformer.resblocks.{i}", w, image["mlp_dim"]))
    return shapes


def params(state: dict, image: dict) -> dict[str, np.ndarray]:
    """`visual.*` (checked against `torch_shapes`) -> our image parameters."""
    get = lambda name: np.asarray(state[name], np.float32)  # noqa: E731
    grid = image["posemb_grid"]
    posemb = get("visual.positional_embedding")  # [1 + grid², D], the class token's first
    out = {"image/patch_embed/kernel": conv(get("visual.conv1.weight"))}
    # the class token's position embedding is folded into the token: the two are always added
    out["image/cls"] = (get("visual.class_embedding") + posemb[0])[None, None]
    out["image/pos_embedding"] = posemb[1:].reshape(grid, grid, -1)
    for ln in norms(image):
        out[f"image/{ln}/scale"], out[f"image/{ln}/bias"] = get(f"visual.{ln}.weight"), get(f"visual.{ln}.bias")
    out["image/proj/kernel"] = get("visual.proj")  # [D, E], used as x @ proj: already a kernel
    for i in range(image["depth"]):
        names = block_names(f"visual.transformer.resblocks.{i}")
        out.update(layout.block_from_torch(get, f"image/encoder/block_{i}", image["heads"], names))
    return out


def state(p: dict, image: dict) -> dict[str, np.ndarray]:
    """Our image parameters -> `visual.*` (the inverse of `params`)."""
    posemb = p["image/pos_embedding"].reshape(-1, p["image/pos_embedding"].shape[-1])
    out = {"visual.conv1.weight": p["image/patch_embed/kernel"].transpose(3, 2, 0, 1)}
    out["visual.class_embedding"] = p["image/cls"].reshape(-1)
    out["visual.positional_embedding"] = np.concatenate([np.zeros_like(posemb[:1]), posemb])
    for ln in norms(image):
        out[f"visual.{ln}.weight"], out[f"visual.{ln}.bias"] = p[f"image/{ln}/scale"], p[f"image/{ln}/bias"]
    out["visual.proj"] = p["image/proj/kernel"]
    for i in range(image["depth"]):
        out.update(
            layout.block_to_torch(p, f"image/encoder/block_{i}", block_names(f"visual.transformer.resblocks.{i}"))
        )
    return out


def mlp_ratio(width: int, mlp_dim: int) -> float:
    """open_clip's mlp_ratio, which it turns back into int(width * mlp_ratio) = mlp_dim."""
    ratio = mlp_dim / width
    return ratio if int(width * ratio) == mlp_dim else (mlp_dim + 0.5) / width


def vision_config(image: dict, size, grid: int, extra: dict) -> dict:
    """Our image spec -> the vision_cfg of open_clip's ViT (`extra`: act_kwargs / norm_kwargs), or a one-line
    error naming the first setting it cannot express."""
    defaults = ImageSpec()
    needs = {k: (getattr(defaults, k),) for k in EVA_PE_KEYS} | _OWN
    for key, want in needs.items():
        if image[key] not in want:
            raise ValueError(f"model.image.{key}={image[key]!r} has no open_clip equivalent (needs one of {want})")
    vision = dict(layers=size.depth, width=size.width, head_width=size.width // size.heads, patch_size=size.patch)
    vision.update(mlp_ratio=mlp_ratio(size.width, size.mlp_dim), image_size=grid * size.patch, **extra)
    if not image["ln_pre"]:
        vision["no_ln_pre"] = True
    return vision
