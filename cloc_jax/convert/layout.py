"""What every importer produces and every exporter reads: a spec and flat parameters in host memory.

Parameters are `{"image/encoder/block_0/attn/query/kernel": np.ndarray}` in cloc_jax's *unrolled*
layout; `to_layout` stacks the blocks into the scanned layout (`.../encoder/blocks/...`, layers first)
when the spec scans. Importers fill a spec from `default_spec()` with the checkpoint's architecture.
"""

import dataclasses
import re

import numpy as np

from cloc_jax.models.spec import build_from_spec, default_spec, with_defaults

_BLOCK = re.compile(r"^(.*/encoder)/block_(\d+)/(.*)$")
_STACK = re.compile(r"^(.*/encoder)/blocks/(.*)$")


@dataclasses.dataclass
class Weights:
    spec: dict
    params: dict[str, np.ndarray]  # flat, "/"-separated, unrolled layout
    source: str  # a file or folder, for error messages


def import_spec(image: dict, text: dict, **model) -> dict:
    """A spec for imported towers (no region extractor) from the checkpoint's architecture keys."""
    spec = default_spec()
    spec["model"].update(region_extractor="none", **{k: v for k, v in model.items() if k != "tokenizer"})
    spec["model"]["image"].update(image)
    spec["model"]["text"].update(text)
    return spec


def unrolled(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scanned layout -> unrolled: `.../encoder/blocks/x` [depth, ...] becomes `.../encoder/block_i/x`."""
    out = {}
    for key, value in flat.items():
        match = _STACK.match(key)
        if not match:
            out[key] = value
            continue
        for i in range(value.shape[0]):
            out[f"{match[1]}/block_{i}/{match[2]}"] = value[i]
    return out


def to_layout(flat: dict[str, np.ndarray], scan: bool) -> dict[str, np.ndarray]:
    """Unrolled layout -> the layout a model with `scan` has (stacking blocks along a leading axis)."""
    if not scan:
        return dict(flat)
    out, stacks = {}, {}
    for key, value in flat.items():
        match = _BLOCK.match(key)
        if match:
            stacks.setdefault(f"{match[1]}/blocks/{match[3]}", {})[int(match[2])] = value
        else:
            out[key] = value
    for key, layers in stacks.items():
        out[key] = np.stack([layers[i] for i in range(len(layers))])
    return out


def expected_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """The unrolled parameter shapes the spec's model has (abstract: nothing is allocated)."""
    import flax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    spec = with_defaults(spec)
    _, model = build_from_spec(spec)
    side, context = spec["image_size"], spec["tokenizer"]["context_length"]
    images, tokens = jnp.zeros((1, side, side, 3)), jnp.zeros((1, context), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens)["params"])
    out = {}
    for key, value in flax.traverse_util.flatten_dict(nn.unbox(shapes), sep="/").items():
        match = _STACK.match(key)
        if match:
            out.update({f"{match[1]}/block_{i}/{match[2]}": value.shape[1:] for i in range(value.shape[0])})
        else:
            out[key] = value.shape
    return out


def check_params(weights: Weights) -> None:
    """Every parameter the spec's model needs is there with its shape, and nothing else: one line naming
    the key and the file otherwise."""
    want = expected_shapes(weights.spec)
    have = weights.params
    if missing := sorted(set(want) - set(have)):
        raise ValueError(f"{weights.source}: no weights for parameter {missing[0]} ({len(missing)} missing)")
    if unexpected := sorted(set(have) - set(want)):
        raise ValueError(f"{weights.source}: unexpected parameter {unexpected[0]} for this architecture")
    for key, shape in want.items():
        if tuple(have[key].shape) != tuple(shape):
            raise ValueError(f"{weights.source}: {key} has shape {tuple(have[key].shape)}, the model wants {shape}")
