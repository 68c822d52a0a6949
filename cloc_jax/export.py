"""Export an inference-only checkpoint (params + model spec + tokenizer) from a training workdir.

python -m cloc_jax.export --workdir=W --out=DIR     # from the newest training checkpoint
model = cloc_jax.load(DIR); model.encode_image(images); model.encode_text(["a red circle"])
The files and their reading live in cloc_jax/weights/native.py; imported weights load through the same `load`.
"""

from absl import app, flags, logging

from cloc_jax.weights.native import export


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
