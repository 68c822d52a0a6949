"""Weights in and out: `load` (any source -> a ready Encoder), `read` (any source -> `layout.Weights`), one
reader (and writer) per checkpoint family, and cloc_jax's own exports and workdirs (`native.py`).

Sources: an export directory or a training workdir, `hf:DIR` (transformers CLIP / SigLIP), `open_clip:DIR`
(open_clip's hub layout), `big_vision:FILE.npz[:VARIANT]` (big_vision SigLIP).
"""

import os

import flax
import jax

from cloc_jax import tokenizers
from cloc_jax.inference import Encoder
from cloc_jax.models.build import abstract_params, build, check_vocabulary
from cloc_jax.weights import big_vision, hf, native, open_clip
from cloc_jax.weights.layout import Weights, check_params

READERS = {"hf": hf.read, "open_clip": open_clip.read, "big_vision": big_vision.read}


def read(source: str) -> Weights:
    """Any source -> Weights in host memory, in the layout the source holds them, checked against the model
    their spec builds (kept in `weights.model`): missing, unexpected or misshapen parameters are one-line errors
    naming the key and the file."""
    kind, sep, rest = source.partition(":")
    if sep and kind in READERS:
        weights = READERS[kind](rest)
        weights.model = build(weights.spec)
    elif os.path.isdir(source):
        weights = native.read(source)
    else:
        raise ValueError(
            f"{source!r} is no known checkpoint: give an export directory, a training workdir or one of "
            + ", ".join(f"{p}:PATH" for p in READERS)
        )
    check_params(weights, abstract_params(weights.model, weights.spec))
    return weights


def load(source: str, scan: bool | None = None) -> Encoder:
    """Any source -> an Encoder with `encode_image` / `encode_text` / `encode_regions` / `image_features` /
    `logits`; `scan` lays the layers out scanned or unrolled (default: as the spec says; imports scan). The model
    is built once (another `scan` than the spec's builds that layout's) and the parameters are re-laid only when
    the source's layout differs."""
    weights = read(source)
    spec, model = weights.spec, weights.model
    if scan is not None and scan != spec.model.scan:
        spec = spec.replace(**{"model.scan": scan})
        model = build(spec)
    tokenizer = tokenizers.from_spec(spec.tokenizer)
    check_vocabulary(tokenizer, model)
    params = weights.in_layout(spec.model.scan)
    tree = flax.traverse_util.unflatten_dict({k: jax.device_put(v) for k, v in params.items()}, sep="/")
    return Encoder(model, tree, tokenizer, spec)


__all__ = ["Weights", "load", "read"]
