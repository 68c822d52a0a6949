"""Export an inference-only checkpoint (params + model spec + tokenizer) and load it back.

python -m cloc_jax.export --workdir=W --out=DIR     # from the newest training checkpoint
model = cloc_jax.load(DIR); model.encode_image(images); model.encode_text(["a red circle"])
Imported weights (hf:, open_clip:, big_vision:) load through the same `load`; see cloc_jax/convert/.
"""

import copy
import json
import os
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from cloc_jax.checkpoint import Checkpoints
from cloc_jax.convert import layout
from cloc_jax.convert.layout import Weights
from cloc_jax.inference import Encoder
from cloc_jax.models.spec import build_from_spec, build_model_from_spec, with_defaults

SPEC_FILE = "spec.json"


def export(workdir: str, out: str, step: int | None = None) -> str:
    """Writes `out/params` (Orbax) and `out/spec.json` from a training workdir's checkpoint: `step`, or
    the newest readable one (an unreadable newer one is named in a warning and left where it is)."""
    return write_export(*read_checkpoint(workdir, step), out)


def read_checkpoint(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """A training workdir's checkpoint `step` (default: the newest readable) -> (spec, nested params)."""
    ckpt = Checkpoints(workdir)

    def read(step: int):
        spec = ckpt.spec(step)
        return spec, ckpt.restore_params(step, _abstract_params(build_model_from_spec(spec), spec))

    try:
        if step is None:
            step, found, _ = ckpt.newest_readable(read)
            if step is None:
                raise FileNotFoundError(f"no checkpoint under {ckpt.directory}; train first")
            return found
        return read(step)
    finally:
        ckpt.close()


def write_export(spec: dict, params, out: str) -> str:
    """Spec + parameters (nested, in the spec's layout) -> an export; a vocab file is copied in so `out`
    stands alone."""
    spec = copy.deepcopy(spec)
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    vocab = spec["tokenizer"].get("path")
    if vocab:  # store the vocab beside the params, referenced relative to the export
        name = os.path.basename(vocab.rstrip("/"))
        if os.path.abspath(vocab) != os.path.join(out, name):
            copy_file = shutil.copytree if os.path.isdir(vocab) else shutil.copy
            copy_file(vocab, os.path.join(out, name), **(dict(dirs_exist_ok=True) if os.path.isdir(vocab) else {}))
        spec["tokenizer"]["path"] = name
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out, "params"), params, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(out, SPEC_FILE), "w") as f:
        json.dump(spec, f, indent=2)
    return out


def _abstract_params(model, spec: dict, device=None):
    """Parameter shapes on one device (the first local one unless given)."""
    side, context = spec["image_size"], spec["tokenizer"]["context_length"]
    images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, context), jnp.int32)
    regions = {}
    if model.region_extractor != "none":
        regions = dict(
            boxes=jax.ShapeDtypeStruct((1, 1, 4), jnp.float32),
            region_tokens=jax.ShapeDtypeStruct((1, 1, context), jnp.int32),
        )
    init = lambda *args, **kw: model.init(jax.random.key(0), *args, **kw)  # noqa: E731 (key traced too)
    shapes = nn.unbox(jax.eval_shape(init, images, tokens, **regions)["params"])
    device = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def read_spec(directory: str) -> dict:
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory} is no known checkpoint: no {SPEC_FILE} (not an export), no checkpoints/ (not a workdir)"
        )
    with open(path) as f:
        spec = json.load(f)
    if spec["tokenizer"].get("path"):
        spec["tokenizer"]["path"] = os.path.join(directory, spec["tokenizer"]["path"])
    return with_defaults(spec)


def read_export(directory: str) -> Weights:
    """An export, or a training workdir (its newest readable checkpoint) -> Weights (flat, unrolled, in
    host memory)."""
    directory = os.path.abspath(directory)
    if not os.path.exists(os.path.join(directory, SPEC_FILE)) and os.path.isdir(os.path.join(directory, "checkpoints")):
        spec, params = read_checkpoint(directory)
    else:
        spec = read_spec(directory)
        model = build_model_from_spec(spec)
        params = ocp.StandardCheckpointer().restore(
            os.path.join(directory, "params"), _abstract_params(model, spec, jax.local_devices(backend="cpu")[0])
        )
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return Weights(spec, layout.unrolled({k: np.asarray(v) for k, v in flat.items()}), directory)


def load(source: str, scan: bool | None = None) -> Encoder:
    """Any source (an export directory, a training workdir, `hf:DIR`, `open_clip:DIR`,
    `big_vision:FILE.npz[:VARIANT]`) -> an
    Encoder with `encode_image` / `encode_text` / `image_features` / `logits`; `scan` lays the layers out
    scanned or unrolled (default: as the source has them; imports scan)."""
    from cloc_jax import convert

    weights = convert.read(source)
    spec = copy.deepcopy(weights.spec)
    if scan is not None:
        spec["model"]["scan"] = scan
    tokenizer, model = build_from_spec(spec)
    params = to_tree(layout.to_layout(weights.params, spec["model"]["scan"]))
    return Encoder(model, params, tokenizer, spec["tokenizer"]["context_length"], spec["image_size"], spec=spec)


def to_tree(flat: dict[str, np.ndarray]) -> dict:
    """Flat host arrays -> the nested parameter tree on the default device (inference is single-device)."""
    return flax.traverse_util.unflatten_dict({k: jax.device_put(v) for k, v in flat.items()}, sep="/")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read and write at INFO
    try:
        print(export(FLAGS.workdir, FLAGS.out, FLAGS.step))
    except (ValueError, FileNotFoundError) as error:  # no checkpoint, none readable: one line
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_string("workdir", None, "training workdir holding checkpoints/", required=True)
    flags.DEFINE_string("out", None, "directory to write the inference checkpoint to", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: newest)")
    app.run(main)
