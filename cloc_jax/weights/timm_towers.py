"""open_clip's timm image towers: EVA-02-CLIP (`eva02_*_clip_*`) and Perception Encoder (`vit_pe_core_*`).

open_clip builds such a tower as `timm.create_model(timm_model_name, num_classes=embed_dim, global_pool=timm_pool)`
(with `timm_proj` null the timm head is the projection), at the timm model's own image size, and names its
parameters `visual.trunk.*`. The timm name fixes the architecture, so `TOWERS` lists each supported name's sizes;
what the two families *are* (their block and position knobs) is `models/spec.FAMILIES["eva02_clip"]` and
`["pe_core"]`. One table of (our key, timm key, transform) per block and per tower maps the weights both ways.
`register` adds a name (a timm model of one of the families registered elsewhere, as tests do).
"""

import dataclasses

import numpy as np

from cloc_jax.models.spec import FAMILIES, ImageSpec
from cloc_jax.weights.layout import conv, heads_in, heads_out, linear


@dataclasses.dataclass(frozen=True)
class TimmTower:
    family: str  # a key of spec.FAMILIES
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int
    image_size: int  # timm builds the model at this size; open_clip does not pass its own
    rope_grid: int  # timm's ref_feat_shape
    layer_scale: bool = False  # timm's init_values is set (PE's Lang and Spatial towers)


TOWERS = {
    "eva02_base_patch16_clip_224": TimmTower("eva02_clip", 768, 12, 12, 2048, 16, 224, 16),
    "eva02_large_patch14_clip_224": TimmTower("eva02_clip", 1024, 24, 16, 2730, 14, 224, 16),
    "eva02_large_patch14_clip_336": TimmTower("eva02_clip", 1024, 24, 16, 2730, 14, 336, 16),
    "vit_pe_core_tiny_patch16_384": TimmTower("pe_core", 192, 12, 3, 768, 16, 384, 24),
    "vit_pe_core_small_patch16_384": TimmTower("pe_core", 384, 12, 6, 1536, 16, 384, 24),
    "vit_pe_core_base_patch16_224": TimmTower("pe_core", 768, 12, 12, 3072, 16, 224, 14),
    "vit_pe_core_large_patch14_336": TimmTower("pe_core", 1024, 24, 16, 4096, 14, 336, 24),
}
POOLS = {"eva02_clip": "token", "pe_core": "map"}  # the timm_pool each family's open_clip configs use
# vision_cfg keys with a timm tower: read, or ignored because open_clip ignores them once timm_model_name is set
_READ = {"timm_model_name", "timm_pool", "timm_proj", "image_size"}
_IGNORED = {"timm_model_pretrained", "timm_drop", "timm_drop_path", "timm_proj_bias", "patch_dropout", "layers",
            "width", "head_width", "mlp_ratio", "patch_size"}  # fmt: skip


def register(name: str, tower: TimmTower) -> None:
    """Makes `name` (a timm model of one of the families, registered with timm elsewhere) readable and writable."""
    if tower.family not in POOLS:
        raise ValueError(f"timm tower {name}: family {tower.family!r}; choose one of {sorted(POOLS)}")
    TOWERS[name] = tower


def image_spec(vision: dict, source: str) -> tuple[str, dict, int]:
    """open_clip's vision_cfg with `timm_model_name` -> (family, image spec keys, image size); one line for a name,
    pool, projection or size cloc_jax does not read."""
    name = vision["timm_model_name"]
    if name not in TOWERS:
        known = ", ".join(sorted(TOWERS))
        raise ValueError(f"{source}: vision_cfg.timm_model_name={name!r} is not a timm tower cloc_jax reads ({known})")
    for key in vision:
        if key not in _READ and key not in _IGNORED:
            raise ValueError(f"{source}: vision_cfg.{key} is not a setting of open_clip's timm towers cloc_jax reads")
    tower = TOWERS[name]
    if vision.get("timm_pool", "avg") != POOLS[tower.family]:
        raise ValueError(f"{source}: vision_cfg.timm_pool={vision.get('timm_pool', 'avg')!r}: {name} is read with "
                         f"timm_pool={POOLS[tower.family]!r}")  # fmt: skip
    if vision.get("timm_proj", "linear") not in (None, ""):
        raise ValueError(f"{source}: vision_cfg.timm_proj={vision.get('timm_proj', 'linear')!r}: cloc_jax reads timm "
                         "towers whose own head projects (timm_proj null)")  # fmt: skip
    size = vision.get("image_size", tower.image_size)
    if size not in (tower.image_size, [tower.image_size] * 2):
        raise ValueError(f"{source}: vision_cfg.image_size={size!r}, but timm builds {name} at {tower.image_size}")
    image = dict(FAMILIES[tower.family]["image"])
    image.update(variant=f"timm/{tower.patch}", width=tower.width, depth=tower.depth, heads=tower.heads)
    image.update(mlp_dim=tower.mlp_dim, posemb_grid=tower.image_size // tower.patch, rope_grid=tower.rope_grid)
    image["layer_scale"] = tower.layer_scale
    return tower.family, image, tower.image_size


def name_of(image: ImageSpec, image_size: int) -> str | None:
    """The timm model name whose tower this image spec is, None when it is no family's; one line when it is a
    family's tower that no registered name has (other sizes, or fine-tuned to another resolution)."""
    for family in POOLS:
        preset = {k: v for k, v in FAMILIES[family]["image"].items() if k not in ("pixel_mean", "pixel_std")}
        if all(getattr(image, k) == (tuple(v) if isinstance(v, list) else v) for k, v in preset.items()):
            break
    else:
        return None
    sizes = (image.width, image.depth, image.heads, image.mlp_dim, int(image.variant.partition("/")[2]), image_size)
    for name, t in TOWERS.items():
        same = (t.width, t.depth, t.heads, t.mlp_dim, t.patch, t.image_size) == sizes
        if t.family == family and same and (t.rope_grid, t.layer_scale) == (image.rope_grid, image.layer_scale):
            return name
    raise ValueError(
        f"no timm {family} tower has width, depth, heads, mlp_dim, patch, image size {sizes} (rope_grid "
        f"{image.rope_grid}, layer_scale {image.layer_scale}); register one with timm and timm_towers.register"
    )


def vision_config(name: str) -> dict:
    """The vision_cfg open_clip builds `name` from (the inverse of `image_spec`)."""
    tower = TOWERS[name]
    return dict(image_size=tower.image_size, timm_model_name=name, timm_model_pretrained=False,
                timm_pool=POOLS[tower.family], timm_proj=None)  # fmt: skip


# (our key, timm key, transform) per block; transforms map timm -> ours and have inverses below
def _block(image: dict, i: int) -> list[tuple[str, str, str]]:
    ours, theirs = f"image/encoder/block_{i}", f"visual.trunk.blocks.{i}"
    rows = [(f"{ours}/{a}/{p}", f"{theirs}.{b}.{q}", "same") for a, b in (("ln1", "norm1"), ("ln2", "norm2"))
            for p, q in (("scale", "weight"), ("bias", "bias"))]  # fmt: skip
    for mine, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        rows.append((f"{ours}/attn/{mine}/kernel", f"{theirs}.attn.{name}.weight", "heads_in"))
        if mine != "key" or image["key_bias"]:
            rows.append((f"{ours}/attn/{mine}/bias", f"{theirs}.attn.{name}.bias", "bias_heads"))
    rows += [(f"{ours}/attn/out/kernel", f"{theirs}.attn.proj.weight", "heads_out"),
             (f"{ours}/attn/out/bias", f"{theirs}.attn.proj.bias", "same")]  # fmt: skip
    norms = [("attn/norm", "attn.norm")] if image["attn_norm"] else []
    norms += [("mlp/norm", "mlp.norm")] if image["mlp_norm"] else []
    rows += [(f"{ours}/{a}/{p}", f"{theirs}.{b}.{q}", "same") for a, b in norms
             for p, q in (("scale", "weight"), ("bias", "bias"))]  # fmt: skip
    ups = ("fc1_g", "fc1_x") if image["mlp"] == "swiglu" else ("fc1",)
    for fc in (*ups, "fc2"):
        rows += [(f"{ours}/mlp/{fc}/kernel", f"{theirs}.mlp.{fc}.weight", "linear"),
                 (f"{ours}/mlp/{fc}/bias", f"{theirs}.mlp.{fc}.bias", "same")]  # fmt: skip
    if image["layer_scale"]:
        rows += [
            (f"{ours}/gamma_attn", f"{theirs}.gamma_1", "same"),
            (f"{ours}/gamma_mlp", f"{theirs}.gamma_2", "same"),
        ]
    return rows


def _tower(image: dict) -> list[tuple[str, str, str]]:
    rows = [("image/patch_embed/kernel", "visual.trunk.patch_embed.proj.weight", "conv")]
    if image["patch_bias"]:
        rows.append(("image/patch_embed/bias", "visual.trunk.patch_embed.proj.bias", "same"))
    norms = [("ln_pre", "norm_pre")] if image["ln_pre"] else []
    norms.append(("ln_post", "norm"))
    rows += [(f"image/{a}/{p}", f"visual.trunk.{b}.{q}", "same") for a, b in norms
             for p, q in (("scale", "weight"), ("bias", "bias"))]  # fmt: skip
    rows += [
        ("image/proj/kernel", "visual.trunk.head.weight", "linear"),
        ("image/proj/bias", "visual.trunk.head.bias", "same"),
    ]
    if image["pool"] == "map":
        pool = "visual.trunk.attn_pool"
        rows += [("image/map_head/probe", f"{pool}.latent", "same")]
        for mine, name in (("query", "q"), ("key", "k"), ("value", "v")):
            rows += [(f"image/map_head/attn/{mine}/kernel", f"{pool}.{name}.weight", "map_in"),
                     (f"image/map_head/attn/{mine}/bias", f"{pool}.{name}.bias", "map_bias")]  # fmt: skip
        rows += [("image/map_head/attn/out/kernel", f"{pool}.proj.weight", "map_out"),
                 ("image/map_head/attn/out/bias", f"{pool}.proj.bias", "same"),
                 ("image/map_head/ln/scale", f"{pool}.norm.weight", "same"),
                 ("image/map_head/ln/bias", f"{pool}.norm.bias", "same")]  # fmt: skip
        for fc in ("fc1", "fc2"):
            rows += [(f"image/map_head/mlp/{fc}/kernel", f"{pool}.mlp.{fc}.weight", "linear"),
                     (f"image/map_head/mlp/{fc}/bias", f"{pool}.mlp.{fc}.bias", "same")]  # fmt: skip
    for i in range(image["depth"]):
        rows += _block(image, i)
    return rows


def _fused(image: dict) -> list[tuple[str, list[str]]]:
    """timm's fused projections and the parts `_tower` names them by: PE's blocks (qkv) and the MAP head (kv)."""
    out = (
        [("visual.trunk.attn_pool.kv", ["visual.trunk.attn_pool.k", "visual.trunk.attn_pool.v"])]
        if image["pool"] == "map"
        else []
    )
    if image["key_bias"]:  # PE: fused qkv with all three biases; EVA-02 (no key bias): separate q, k, v
        for i in range(image["depth"]):
            block = f"visual.trunk.blocks.{i}.attn"
            out.append((f"{block}.qkv", [f"{block}.q_proj", f"{block}.k_proj", f"{block}.v_proj"]))
    return out


def _prefix(image: dict) -> int:
    return 1 if image["pool"] == "cls" or image["class_token"] else 0


def torch_shapes(image: dict, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """The `visual.trunk.*` state dict (names -> shapes) open_clip's timm tower of this image spec has."""
    w, hidden, grid = image["width"], image["mlp_dim"], image["posemb_grid"]
    patch = int(image["variant"].partition("/")[2])

    def shape(name: str) -> tuple[int, ...]:
        if name.endswith("patch_embed.proj.weight"):
            return (w, 3, patch, patch)
        if name.endswith("head.weight") or name.endswith("head.bias"):
            return (embed_dim, w)[: 2 if name.endswith("weight") else 1]
        if name.endswith("latent"):
            return (1, 1, w)
        if ".mlp.fc2.weight" in name:
            return (w, hidden)
        if ".mlp.fc1" in name or ".mlp.norm" in name:  # fc1, fc1_g, fc1_x: [hidden, w]; biases and the norm: [hidden]
            return (hidden, w) if name.endswith(".weight") and ".norm." not in name else (hidden,)
        if name.endswith(".weight") and "norm" not in name:  # the attention's linear maps
            return (w, w)
        return (w,)

    shapes = {theirs: shape(theirs) for _, theirs, _ in _tower(image)}
    shapes["visual.trunk.pos_embed"] = (1, grid * grid + _prefix(image), w)
    if _prefix(image):
        shapes["visual.trunk.cls_token"] = (1, 1, w)
    for fused, parts in _fused(image):
        for part in parts:
            shapes.pop(f"{part}.weight"), shapes.pop(f"{part}.bias")
        shapes[f"{fused}.weight"], shapes[f"{fused}.bias"] = (len(parts) * w, w), (len(parts) * w,)
    return shapes


def params(state: dict, image: dict) -> dict[str, np.ndarray]:
    """`visual.trunk.*` (checked against `torch_shapes`) -> our image parameters."""
    state = dict(state)
    for fused, parts in _fused(image):
        for kind in ("weight", "bias"):
            for part, piece in zip(parts, np.split(np.asarray(state.pop(f"{fused}.{kind}")), len(parts)), strict=True):
                state[f"{part}.{kind}"] = piece
    heads, map_heads = image["heads"], image["map_heads"] or image["heads"]
    read = dict(same=lambda a: a, linear=linear, conv=conv,
                heads_in=lambda a: heads_in(a, heads), heads_out=lambda a: heads_out(a, heads),
                bias_heads=lambda a: a.reshape(heads, -1), map_in=lambda a: heads_in(a, map_heads),
                map_out=lambda a: heads_out(a, map_heads), map_bias=lambda a: a.reshape(map_heads, -1))  # fmt: skip
    get = lambda name: np.asarray(state[name], np.float32)  # noqa: E731
    out = {ours: read[how](get(theirs)) for ours, theirs, how in _tower(image)}
    posemb = get("visual.trunk.pos_embed")[0]  # [prefix + grid², D], the class token's first
    grid = image["posemb_grid"]
    out["image/pos_embedding"] = posemb[-grid * grid :].reshape(grid, grid, -1)
    if _prefix(image):  # the class token's position embedding folded into it: both are constants
        out["image/cls"] = get("visual.trunk.cls_token") + posemb[0]
    return out


def state(p: dict, image: dict) -> dict[str, np.ndarray]:
    """Our image parameters -> `visual.trunk.*` (the inverse of `params`)."""
    flat_in = lambda k: np.ascontiguousarray(k.reshape(k.shape[0], -1).T)  # noqa: E731  [D, H, K] -> [H*K, D]
    write = dict(same=lambda a: a, linear=linear, conv=lambda a: np.ascontiguousarray(a.transpose(3, 2, 0, 1)),
                 heads_in=flat_in, map_in=flat_in, bias_heads=lambda a: a.reshape(-1), map_bias=lambda a: a.reshape(-1),
                 heads_out=lambda a: np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T),
                 map_out=lambda a: np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T))  # fmt: skip
    out = {theirs: write[how](np.asarray(p[ours])) for ours, theirs, how in _tower(image)}
    for fused, parts in _fused(image):
        for kind in ("weight", "bias"):
            out[f"{fused}.{kind}"] = np.concatenate([out.pop(f"{part}.{kind}") for part in parts])
    posemb = p["image/pos_embedding"].reshape(-1, p["image/pos_embedding"].shape[-1])
    if _prefix(image):
        out["visual.trunk.cls_token"] = np.asarray(p["image/cls"]).reshape(1, 1, -1)
        posemb = np.concatenate([np.zeros_like(posemb[:1]), posemb])
    out["visual.trunk.pos_embed"] = posemb[None]
    return out
