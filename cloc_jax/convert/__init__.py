"""Weights in and out: one reader per checkpoint family, all producing `layout.Weights` (a spec and flat
parameters in host memory), and writers for the families an architecture maps to.

Sources: `hf:DIR` (transformers CLIP / SigLIP), `open_clip:DIR` (open_clip's hub layout),
`big_vision:FILE.npz[:VARIANT]` (big_vision SigLIP), or an export directory (python -m cloc_jax.export).
"""

import os

from cloc_jax.convert.layout import Weights

PREFIXES = ("hf", "open_clip", "big_vision")


def read(source: str) -> Weights:
    """Any source -> Weights, checked against the model its spec builds (missing, unexpected or misshapen
    parameters are one-line errors naming the key and the file)."""
    from cloc_jax.convert import layout

    kind, sep, rest = source.partition(":")
    if sep and kind in PREFIXES:
        if kind == "hf":
            from cloc_jax.convert import hf as family
        elif kind == "open_clip":
            from cloc_jax.convert import open_clip as family
        else:
            from cloc_jax.convert import big_vision as family
        weights = family.read(rest)
    elif os.path.isdir(source):
        from cloc_jax.export import read_export

        weights = read_export(source)
    else:
        raise ValueError(
            f"{source!r} is no known checkpoint: give an export directory, a training workdir or one of "
            + ", ".join(f"{p}:PATH" for p in PREFIXES)
        )
    layout.check_params(weights)
    return weights
