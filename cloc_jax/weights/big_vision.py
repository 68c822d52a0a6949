"""big_vision SigLIP checkpoints: `big_vision:FILE.npz[:VARIANT]`, the two towers of SigLIP and SigLIP 2 (not NaFlex)
as big_vision's `two_towers` model saves them, a flat npz of the parameter tree joined by "/".

`img/...` is the ViT (MAP head, an optional `head` projection), `txt/...` the text transformer and its `head`, `t` the
log temperature, `b` the bias; the "params/" prefix of released files is optional and the blocks may be unrolled
(`encoderblock_{i}/...`) or scanned (`encoderblock/...`, layers first: big_vision's `scan=True`). Both libraries are
flax, so nothing transposes: kernels are [in, out], attention [D, H, K] / [H, K, D], the patch conv [p, p, 3, D].
Sizes come from the shapes; VARIANT ("B/16", "So400m/14", "B/16/256") only checks them. The SentencePiece model is
not in the npz: it lies beside it (FILE.model, or the folder's only *.model).
"""

import glob
import math
import os
import re
import zipfile

import numpy as np

from cloc_jax.models.spec import family_spec
from cloc_jax.weights.layout import Weights

# big_vision's vit.decode_variant: name -> (width, depth, heads, mlp_dim)
VARIANTS = {
    "mu": (32, 1, 2, 128), "Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096), "So400m": (1152, 27, 16, 4304), "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144), "g-opt": (1536, 40, 16, 6144), "G": (1664, 48, 16, 8192),
    "G-opt": (1536, 48, 16, 8192), "e": (1792, 56, 16, 15360),
}  # fmt: skip
_TOWERS = {"img/Transformer": "image/encoder", "txt/Encoder_0": "text/encoder"}
_IN_BLOCK = (
    ("LayerNorm_0", "ln1"), ("LayerNorm_1", "ln2"), ("MultiHeadDotProductAttention_0", "attn"),
    ("MlpBlock_0/Dense_0", "mlp/fc1"), ("MlpBlock_0/Dense_1", "mlp/fc2"),
)  # fmt: skip
_NAMES = (
    ("img/embedding", "image/patch_embed"), ("img/pos_embedding", "image/pos_embedding"),
    ("img/Transformer/encoder_norm", "image/ln_post"), ("img/MAPHead_0/probe", "image/map_head/probe"),
    ("img/MAPHead_0/MultiHeadDotProductAttention_0", "image/map_head/attn"),
    ("img/MAPHead_0/LayerNorm_0", "image/map_head/ln"), ("img/MAPHead_0/MlpBlock_0/Dense_0", "image/map_head/mlp/fc1"),
    ("img/MAPHead_0/MlpBlock_0/Dense_1", "image/map_head/mlp/fc2"), ("img/head", "image/proj"),
    ("txt/Embed_0/embedding", "text/token_embed/embedding"), ("txt/pos_embedding", "text/pos_embedding"),
    ("txt/Encoder_0/encoder_norm", "text/ln_final"), ("txt/head", "text/proj"), ("t", "log_scale"), ("b", "bias"),
)  # fmt: skip
_BLOCK = re.compile(r"^(img/Transformer|txt/Encoder_0)/encoderblock(?:_(\d+))?/(.+)$")
_OUR_BLOCK = re.compile(r"^(image|text)/encoder/block_(\d+)/(.+)$")


def _rename(key: str, pairs, back: bool = False) -> str | None:
    """The name of `key` on the other side of a (theirs, ours) prefix table, or None."""
    for theirs, ours in pairs:
        a, b = (ours, theirs) if back else (theirs, ours)
        if key == a or key.startswith(a + "/"):
            return b + key[len(a) :]
    return None


def _split(rest: str) -> tuple[str, str]:
    """ "FILE.npz" or "FILE.npz:VARIANT" -> (file, variant or "")."""
    if os.path.exists(rest) or ":" not in rest:
        return rest, ""
    path, _, variant = rest.rpartition(":")
    return path, variant


def read(rest: str) -> Weights:
    """`big_vision:FILE.npz[:VARIANT]` -> Weights; every parameter of the file is used, with its shape."""
    path, variant = _split(rest)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"big_vision:{path}: no such file (give a big_vision SigLIP .npz)")
    try:
        with np.load(path) as npz:
            flat = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:  # a .npy (no `with`), not a zip
        raise ValueError(f"big_vision:{path}: not an npz of big_vision parameters ({type(e).__name__})") from e
    params, origin, scanned = _convert(flat, path)
    prefix = "params/" if any(k.startswith("params/") for k in flat) else ""

    def name(key: str) -> str:  # ours -> how the file names it (or would)
        if key in origin:
            return origin[key]
        match = _OUR_BLOCK.match(key)
        if not match:
            return prefix + (_rename(key, _NAMES, back=True) or key)
        tower = next(t for t, o in _TOWERS.items() if o.startswith(match[1]))
        inner = _rename(match[3], _IN_BLOCK, back=True) or match[3]
        if tower in scanned:
            return f"{prefix}{tower}/encoderblock/{inner}[{match[2]}]"
        return f"{prefix}{tower}/encoderblock_{match[2]}/{inner}"

    def shape(key: str, rank: int) -> tuple[int, ...]:
        if key not in params:
            raise ValueError(f"{path}: missing parameter {name(key)}")
        if params[key].ndim != rank:
            raise ValueError(f"{path}: {name(key)} has shape {params[key].shape}, a rank-{rank} array expected")
        return params[key].shape

    patch, _, _, width = shape("image/patch_embed/kernel", 4)  # [p, p, 3, D]
    grid = shape("image/pos_embedding", 3)[0]  # [g, g, D]
    vocab, text_width = shape("text/token_embed/embedding", 2)  # [V, D]
    context = shape("text/pos_embedding", 2)[0]  # [L, D]
    embed_dim = shape("text/proj/kernel", 2)[1]  # [D, E]
    project = "image/proj/kernel" in params or "image/proj/bias" in params
    towers = {tower: _tower_sizes(params, tower, shape, name, path) for tower in ("image", "text")}
    found = dict(width=width, **towers["image"], patch=patch, image_size=grid * patch)
    if variant:
        _check_variant(variant, found, path)
    if not project and width != embed_dim:
        raise ValueError(
            f"{path}: the image tower has no head, so its {width} features are its embedding, but "
            f"{name('text/proj/kernel')} embeds texts in {embed_dim}"
        )
    image = dict(
        variant=f"{variant.split('/')[0] if variant else 'big_vision'}/{patch}",
        width=width,
        **towers["image"],
        project=project,
        proj_bias=project,
        posemb_grid=grid,
    )
    text = dict(width=text_width, **towers["text"], vocab_size=vocab)
    spec = family_spec(
        "big_vision_siglip", image, text, dict(embed_dim=embed_dim), _tokenizer(path, context), image_size=grid * patch
    )
    return Weights(spec, params, path, name)  # checked against the model it loads into, named as the file does


def _convert(flat: dict, source: str) -> tuple[dict[str, np.ndarray], dict[str, str], set[str]]:
    """The file's arrays -> (our unrolled parameters, our key -> the file's name for it, the scanned towers)."""
    params, origin, scanned = {}, {}, set()

    def put(key: str, value: np.ndarray, file_key: str) -> None:
        if key in params:
            raise ValueError(f"{source}: {file_key} and {origin[key]} are the same parameter (mixed layouts?)")
        params[key], origin[key] = value, file_key

    for file_key, array in flat.items():
        key = file_key.removeprefix("params/")
        value = np.asarray(array, np.float32)
        match = _BLOCK.match(key)
        mine = _rename(match[3], _IN_BLOCK) if match else _rename(key, _NAMES)
        if mine is None:
            raise ValueError(f"{source}: unexpected parameter {file_key} for a big_vision SigLIP model")
        if not match:
            put(mine, _reshape(mine, value, file_key, source), file_key)
        elif match[2] is not None:
            put(f"{_TOWERS[match[1]]}/block_{int(match[2])}/{mine}", value, file_key)
        elif value.ndim == 0:
            raise ValueError(f"{source}: {file_key} is a scalar; scanned block parameters stack the layers first")
        else:
            scanned.add(match[1])
            for i, layer in enumerate(value):
                put(f"{_TOWERS[match[1]]}/block_{i}/{mine}", layer, f"{file_key}[{i}]")
    return params, origin, scanned


def _reshape(key: str, value: np.ndarray, file_key: str, source: str) -> np.ndarray:
    """big_vision's shapes -> ours: t, b [1] -> []; pos_embedding [1, N, D] -> image [g, g, D], text [L, D]."""
    if key in ("log_scale", "bias"):
        if value.size != 1:
            raise ValueError(f"{source}: {file_key} has shape {value.shape}; a scalar or [1] expected")
        return value.reshape(())
    if not key.endswith("pos_embedding"):
        return value
    n = value.shape[1] if value.ndim == 3 and value.shape[0] == 1 else 0
    grid = math.isqrt(n)
    if key == "text/pos_embedding" and n:
        return value[0]
    if key == "image/pos_embedding" and n and grid * grid == n:
        return value.reshape(grid, grid, value.shape[-1])
    raise ValueError(f"{source}: {file_key} has shape {value.shape}; [1, N, D] expected (N a square for images)")


def _tower_sizes(params: dict, tower: str, shape, name, source: str) -> dict[str, int]:
    """depth, heads and mlp_dim of a tower's blocks, from block 0 (the shape check holds the others to them)."""
    stem = f"{tower}/encoder/block_"
    depth = 1 + max((int(k[len(stem) :].split("/")[0]) for k in params if k.startswith(stem)), default=-1)
    if not depth:
        raise ValueError(f"{source}: missing parameter {name(stem + '0/ln1/scale')} (the tower has no blocks)")
    heads = shape(f"{stem}0/attn/query/kernel", 3)[1]  # [D, H, K]
    return dict(depth=depth, heads=heads, mlp_dim=shape(f"{stem}0/mlp/fc1/kernel", 2)[1])


def _check_variant(variant: str, found: dict[str, int], source: str) -> None:
    """NAME[/PATCH[/RES]] (big_vision's names; "-i18n" allowed) against the sizes the weights have."""
    name, *rest = variant.replace("-i18n", "").split("/")
    if name not in VARIANTS or len(rest) > 2 or not all(part.isdigit() for part in rest):
        raise ValueError(
            f"{source}: unknown big_vision variant {variant!r}; use NAME[/PATCH[/RES]] with NAME in {list(VARIANTS)}"
        )
    want = dict(zip(("width", "depth", "heads", "mlp_dim"), VARIANTS[name]))
    want.update(zip(("patch", "image_size"), map(int, rest)))
    for key, value in want.items():
        if found[key] != value:
            raise ValueError(f"{source}: variant {variant!r} means {key}={value}, the weights have {key}={found[key]}")


def _tokenizer(path: str, context: int) -> dict:
    """The tokenizer spec: big_vision lower-cases, appends EOS to the SentencePiece ids, keeps EOS last when it
    truncates ("sticky") and pads to the context. SigLIP pads with EOS (`tokenize(pad_value=1)`, T5 vocabularies,
    which have no BOS), SigLIP 2 with the pad token (`tok`, Gemma's vocabulary): the tower pools the last position."""
    import sentencepiece

    model = _sentencepiece_file(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    if sp.eos_id() < 0:
        raise ValueError(f"{model} defines no end-of-sequence id: not a big_vision SigLIP tokenizer")
    pad = sp.pad_id() if sp.bos_id() >= 0 and sp.pad_id() >= 0 else sp.eos_id()
    return dict(type="big_vision", path=model, lowercase=True, context_length=context, pad_id=pad)


def _sentencepiece_file(path: str) -> str:
    same = os.path.splitext(path)[0] + ".model"
    if os.path.isfile(same):
        return same
    found = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), "*.model")))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(
        f"{path}: put the checkpoint's SentencePiece model beside it as {os.path.basename(same)} (SigLIP: T5's "
        "c4_en, gs://t5-data/vocabs/cc_en.32000/sentencepiece.model, or mc4 for i18n; SigLIP 2: Gemma's)"
        + (f"; found {len(found)} *.model files and none of that name" if found else "")
    )
