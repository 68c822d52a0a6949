"""Convert weights between cloc_jax and the libraries around it.

python -m cloc_jax.convert --from=hf:/ckpts/clip-vit-base-patch16 --out=/tmp/clip_export    # -> a cloc_jax export
python -m cloc_jax.convert --from=/tmp/cloc_export --to=hf --out=/tmp/cloc_hf              # -> transformers
python -m cloc_jax.convert --from=/tmp/cloc_export --to=open_clip --out=/tmp/cloc_oc      # -> open_clip's layout
"""

import sys

import flax
from absl import app, flags, logging

from cloc_jax import tokenizers
from cloc_jax import weights as cloc_weights
from cloc_jax.models.build import check_vocabulary
from cloc_jax.weights import hf, open_clip
from cloc_jax.weights.native import write_export

TARGETS = ("cloc_jax", "hf", "open_clip")
WRITERS = {"hf": hf.write, "open_clip": open_clip.write}


def convert(source: str, out: str, to: str = "cloc_jax", scan: bool | None = None) -> str:
    """Reads any `cloc_jax.load` source and writes it in the `to` layout at `out`; returns `out`."""
    if to not in TARGETS:
        raise ValueError(f"--to={to!r}; choose one of {TARGETS}")
    weights = cloc_weights.read(source)
    tokenizer = tokenizers.from_spec(weights.spec.tokenizer)
    check_vocabulary(tokenizer, weights.model)
    if to == "cloc_jax":
        spec = weights.spec if scan is None else weights.spec.replace(**{"model.scan": scan})
        params = flax.traverse_util.unflatten_dict(weights.in_layout(spec.model.scan), sep="/")
        return write_export(spec, params, out)
    heads = sorted({k.split("/")[0] for k in weights.params} - {"image", "text", "log_scale", "bias"})
    if heads:
        print(f"Not exported (no place for them in {to}): {', '.join(heads)}", file=sys.stderr)
    return WRITERS[to](weights, tokenizer, out)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
    try:
        print(convert(FLAGS["from"].value, FLAGS.out, FLAGS.to))
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_string("from", None, "source: an export dir, hf:DIR, open_clip:DIR, big_vision:FILE.npz[:VARIANT]")
    flags.DEFINE_string("out", None, "directory to write", required=True)
    flags.DEFINE_enum("to", "cloc_jax", TARGETS, "layout to write: a cloc_jax export, transformers or open_clip")
    flags.mark_flag_as_required("from")
    app.run(main)
