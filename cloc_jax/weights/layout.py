"""What every importer produces and every exporter reads: a spec and flat parameters in host memory.

Parameters are `{"image/encoder/block_0/attn/query/kernel": np.ndarray}` in the *unrolled* layout (importers,
which read one block at a time) or `{".../encoder/blocks/attn/query/kernel": [depth, ...]}` in the *scanned*
layout (exports and checkpoints of scanned models); `Weights.in_layout` converts only when the two differ.
"""

import dataclasses
import re
from collections.abc import Callable

import flax
import numpy as np

from cloc_jax.models.spec import Spec

_BLOCK = re.compile(r"^(.*/encoder\w*)/block_(\d+)/(.*)$")  # encoder, encoder_clustered
_STACK = re.compile(r"^(.*/encoder\w*)/blocks/(.*)$")


@dataclasses.dataclass
class Weights:
    spec: Spec
    params: dict[str, np.ndarray]  # flat, "/"-separated, in the layout `scanned` says
    source: str  # a file or folder, for error messages
    name: Callable[[str], str] | None = None  # our key -> the file's name of it, for error messages
    scanned: bool = False  # the blocks stacked along a leading layers axis
    model: object = None  # the model of `spec`, when reading had to build it (native files): reused by `load`

    def in_layout(self, scan: bool) -> dict[str, np.ndarray]:
        """The parameters in the layout a model with `scan` has (converted one way only when they differ)."""
        if scan == self.scanned:
            return dict(self.params)
        return stacked(self.params) if scan else unrolled(self.params)


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


def stacked(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unrolled layout -> scanned (blocks stacked along a leading layers axis)."""
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


def flat_shapes(abstract: dict, scanned: bool) -> dict[str, tuple[int, ...]]:
    """Nested parameter shapes (`build.abstract_params` of the spec's model) -> {flat key: shape}; for unrolled
    weights (importers read one block at a time) a scanned model's stacks [depth, ...] count as depth blocks."""
    flat = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract, sep="/").items()}
    if scanned:
        return flat
    out = {}
    for key, shape in flat.items():
        match = _STACK.match(key)
        if match:
            out.update({f"{match[1]}/block_{i}/{match[2]}": shape[1:] for i in range(shape[0])})
        else:
            out[key] = shape
    return out


def check_shapes(have: dict, want: dict, source: str, name: Callable[[str], str] | None = None) -> None:
    """Parameter shapes `have` ({key: shape}) are exactly `want`: nothing missing, nothing left over, no shape
    off; otherwise one line naming the file and the key (as `name` spells it, or as it is)."""
    name = name or str
    if missing := sorted(set(want) - set(have)):
        raise ValueError(f"{source}: missing parameter {name(missing[0])} ({len(missing)} missing)")
    if unexpected := sorted(set(have) - set(want)):
        raise ValueError(f"{source}: unexpected parameter {name(unexpected[0])} for this architecture")
    for key, shape in want.items():
        if tuple(have[key]) != tuple(shape):
            raise ValueError(
                f"{source}: {name(key)} has shape {tuple(have[key])}, the architecture needs {tuple(shape)}"
            )


def check_params(weights: Weights, abstract: dict) -> None:
    """Every parameter the spec's model needs (`abstract`: its nested shapes) is there with its shape, and
    nothing else."""
    have = {key: value.shape for key, value in weights.params.items()}
    check_shapes(have, flat_shapes(abstract, weights.scanned), weights.source, weights.name)


def same_in_both_towers(key: str, values: list, source: str):
    """A setting cloc_jax shares between the towers (activation, LayerNorm epsilon) read from both of a file's."""
    if len(set(values)) != 1:
        raise ValueError(f"{source}: the towers differ in {key} ({values}); cloc_jax shares it between them")
    return values[0]


# torch <-> cloc_jax for one transformer block. torch Linear weights are [out, in]; ours are einsum kernels
# at their true rank: query/key/value [D, H, K], out [H, K, D].
def linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def heads_in(w: np.ndarray, heads: int) -> np.ndarray:
    """torch [H*K, D] -> [D, H, K]"""
    return np.ascontiguousarray(w.T.reshape(w.shape[1], heads, -1))


def heads_out(w: np.ndarray, heads: int) -> np.ndarray:
    """torch [D, H*K] -> [H, K, D]"""
    return np.ascontiguousarray(w.T.reshape(heads, -1, w.shape[0]))


def conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d [D, C, p, p] -> flax [p, p, C, D]"""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def block_from_torch(get, ours: str, heads: int, names: dict[str, str]) -> dict[str, np.ndarray]:
    """One block from torch weights. `get(name)` reads a torch tensor as numpy; `names` gives the torch names of
    ln1, ln2, fc1, fc2, out and either q/k/v (separate) or qkv (fused [3D, D], open_clip's in_proj)."""
    out = {}
    for mine, theirs in (("ln1", names["ln1"]), ("ln2", names["ln2"])):
        out[f"{ours}/{mine}/scale"], out[f"{ours}/{mine}/bias"] = get(f"{theirs}.weight"), get(f"{theirs}.bias")
    for mine, theirs in (("fc1", names["fc1"]), ("fc2", names["fc2"])):
        out[f"{ours}/mlp/{mine}/kernel"], out[f"{ours}/mlp/{mine}/bias"] = (
            linear(get(f"{theirs}.weight")),
            get(f"{theirs}.bias"),
        )
    if "qkv" in names:
        weights = np.split(get(names["qkv"] + "_weight"), 3)
        biases = np.split(get(names["qkv"] + "_bias"), 3)
    else:
        weights = [get(f"{names[n]}.weight") for n in "qkv"]
        biases = [get(f"{names[n]}.bias") for n in "qkv"]
    for mine, w, b in zip(("query", "key", "value"), weights, biases, strict=True):
        out[f"{ours}/attn/{mine}/kernel"] = heads_in(w, heads)
        out[f"{ours}/attn/{mine}/bias"] = b.reshape(heads, -1)
    out[f"{ours}/attn/out/kernel"] = heads_out(get(f"{names['out']}.weight"), heads)
    out[f"{ours}/attn/out/bias"] = get(f"{names['out']}.bias")
    return out


def block_to_torch(params: dict[str, np.ndarray], ours: str, names: dict[str, str]) -> dict[str, np.ndarray]:
    """The inverse of `block_from_torch`."""
    out = {}
    for mine in ("ln1", "ln2"):
        out[f"{names[mine]}.weight"], out[f"{names[mine]}.bias"] = (
            params[f"{ours}/{mine}/scale"],
            params[f"{ours}/{mine}/bias"],
        )
    for mine in ("fc1", "fc2"):
        out[f"{names[mine]}.weight"] = linear(params[f"{ours}/mlp/{mine}/kernel"])
        out[f"{names[mine]}.bias"] = params[f"{ours}/mlp/{mine}/bias"]
    flat_in = lambda k: np.ascontiguousarray(k.reshape(k.shape[0], -1).T)  # noqa: E731  [D, H, K] -> [H*K, D]
    weights = [flat_in(params[f"{ours}/attn/{m}/kernel"]) for m in ("query", "key", "value")]
    biases = [params[f"{ours}/attn/{m}/bias"].reshape(-1) for m in ("query", "key", "value")]
    if "qkv" in names:
        out[names["qkv"] + "_weight"], out[names["qkv"] + "_bias"] = np.concatenate(weights), np.concatenate(biases)
    else:
        for n, w, b in zip("qkv", weights, biases, strict=True):
            out[f"{names[n]}.weight"], out[f"{names[n]}.bias"] = w, b
    kernel = params[f"{ours}/attn/out/kernel"]
    out[f"{names['out']}.weight"] = np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)
    out[f"{names['out']}.bias"] = params[f"{ours}/attn/out/bias"]
    return out


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
    """A safetensors file (numpy, no torch needed) or a torch pickle (needs torch; weights only)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a torch pickle: reading it needs torch (or convert it to safetensors)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
