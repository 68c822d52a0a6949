"""cloc_jax's own files: exports (`params/` Orbax + `spec.json` + the vocabulary) and training workdirs.

`python -m cloc_jax.export --workdir=W --out=DIR` writes an export from a workdir's newest checkpoint; both open
with `cloc_jax.load`. Reading builds the spec's model once (its parameter shapes are the restore target) and
keeps the parameters in the layout they were saved in.
"""

import json
import os
import shutil

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from cloc_jax.checkpoint import Checkpoints
from cloc_jax.models.build import abstract_params, build
from cloc_jax.models.spec import Spec, from_dict
from cloc_jax.weights.layout import Weights

SPEC_FILE = "spec.json"


def export(workdir: str, out: str, step: int | None = None) -> str:
    """Writes `out/params` (Orbax) and `out/spec.json` from a training workdir's checkpoint: `step`, or the newest
    readable one (an unreadable newer one is named in a warning and left where it is)."""
    weights = read_checkpoint(workdir, step)
    return write_export(weights.spec, flax.traverse_util.unflatten_dict(weights.params, sep="/"), out)


def read_checkpoint(workdir: str, step: int | None = None) -> Weights:
    """A training workdir's checkpoint `step` (default: the newest readable) -> Weights (host memory, its layout)."""
    ckpt = Checkpoints(workdir)
    cpu = jax.local_devices(backend="cpu")[0]

    def read(step: int) -> Weights:
        spec = ckpt.spec(step)
        model = build(spec)
        params = ckpt.restore_params(step, abstract_params(model, spec, cpu))
        return _weights(spec, params, ckpt.directory, model)

    try:
        if step is not None:
            return read(step)
        step, found, _ = ckpt.newest_readable(read)
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory}; train first")
        return found
    finally:
        ckpt.close()


def write_export(spec: Spec, params, out: str) -> str:
    """Spec + parameters (nested, in the spec's layout) -> an export; a vocab file is copied in so `out` stands
    alone."""
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    saved = spec.to_json()
    vocab = spec.tokenizer.path
    if vocab:  # store the vocab beside the params, referenced relative to the export
        name = os.path.basename(vocab.rstrip("/"))
        if os.path.abspath(vocab) != os.path.join(out, name):
            if os.path.isdir(vocab):
                shutil.copytree(vocab, os.path.join(out, name), dirs_exist_ok=True)
            else:
                shutil.copy(vocab, os.path.join(out, name))
        saved["tokenizer"]["path"] = name
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out, "params"), params, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(out, SPEC_FILE), "w") as f:
        json.dump(saved, f, indent=2)
    return out


def read_spec(directory: str) -> Spec:
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory} is no known checkpoint: no {SPEC_FILE} (not an export), no checkpoints/ (not a workdir)"
        )
    with open(path) as f:
        spec = json.load(f)
    if spec["tokenizer"].get("path"):
        spec["tokenizer"]["path"] = os.path.join(directory, spec["tokenizer"]["path"])
    return from_dict(spec)


def read(directory: str) -> Weights:
    """An export, or a training workdir (its newest readable checkpoint) -> Weights."""
    directory = os.path.abspath(directory)
    if not os.path.exists(os.path.join(directory, SPEC_FILE)) and os.path.isdir(os.path.join(directory, "checkpoints")):
        return read_checkpoint(directory)
    spec = read_spec(directory)
    model = build(spec)
    target = abstract_params(model, spec, jax.local_devices(backend="cpu")[0])
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
    return _weights(spec, params, directory, model)


def _weights(spec: Spec, params, source: str, model) -> Weights:
    flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
    return Weights(spec, flat, source, scanned=spec.model.scan, model=model)
