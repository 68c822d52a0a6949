"""Export an inference-only checkpoint (params + model spec + tokenizer) and load it back.

python -m cloc_jax.export --workdir=W --out=DIR     # from the newest training checkpoint
model = cloc_jax.load(DIR); model.encode_image(images); model.encode_text(["a red circle"])
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags

from cloc_jax.checkpoint import Checkpoints
from cloc_jax.models.spec import build_from_spec
from cloc_jax.inference import Encoder

SPEC_FILE = "spec.json"


def export(workdir: str, out: str, step: int | None = None) -> str:
    """Writes `out/params` (Orbax) and `out/spec.json`; a vocab file is copied in so `out` stands alone."""
    ckpt = Checkpoints(workdir)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt.directory}; train first")
    spec = ckpt.spec(step)
    _, model = build_from_spec(spec)
    params = ckpt.restore_params(step, _abstract_params(model, spec))
    ckpt.close()
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    vocab = spec["tokenizer"].get("path")
    if vocab:  # store the vocab beside the params, referenced relative to the export
        name = os.path.basename(vocab.rstrip("/"))
        copy = shutil.copytree if os.path.isdir(vocab) else shutil.copy
        copy(vocab, os.path.join(out, name))
        spec["tokenizer"]["path"] = name
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out, "params"), params, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(out, SPEC_FILE), "w") as f:
        json.dump(spec, f, indent=2)
    return out


def _abstract_params(model, spec: dict):
    """Parameter shapes on the first local device (export and inference are single-device)."""
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
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def load(directory: str) -> Encoder:
    """An exported directory -> Encoder with `encode_image` / `encode_text`."""
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, SPEC_FILE)) as f:
        spec = json.load(f)
    if spec["tokenizer"].get("path"):
        spec["tokenizer"]["path"] = os.path.join(directory, spec["tokenizer"]["path"])
    tokenizer, model = build_from_spec(spec)
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), _abstract_params(model, spec))
    return Encoder(model, params, tokenizer, spec["tokenizer"]["context_length"], spec["image_size"])


def main(argv):
    del argv
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.step))


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_string("workdir", None, "training workdir holding checkpoints/", required=True)
    flags.DEFINE_string("out", None, "directory to write the inference checkpoint to", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: newest)")
    app.run(main)
