"""Convert weights between cloc_jax and the libraries around it.

python -m cloc_jax.convert --from=hf:/ckpts/clip-vit-base-patch16 --out=/tmp/clip_export    # -> a cloc_jax export
python -m cloc_jax.convert --from=/tmp/cloc_export --to=hf --out=/tmp/cloc_hf              # -> transformers
python -m cloc_jax.convert --from=/tmp/cloc_export --to=open_clip --out=/tmp/cloc_oc      # -> open_clip's layout
"""

import sys

from absl import app, flags, logging

TARGETS = ("cloc_jax", "hf", "open_clip")


def convert(source: str, out: str, to: str = "cloc_jax", scan: bool | None = None) -> str:
    """Reads any `cloc_jax.load` source and writes it in the `to` layout at `out`; returns `out`."""
    from cloc_jax import convert as conv
    from cloc_jax.convert.layout import to_layout
    from cloc_jax.export import to_tree, write_export
    from cloc_jax.models.spec import build_from_spec

    if to not in TARGETS:
        raise ValueError(f"--to={to!r}; choose one of {TARGETS}")
    weights = conv.read(source)
    if to == "cloc_jax":
        if scan is not None:
            weights.spec["model"]["scan"] = scan
        return write_export(weights.spec, to_tree(to_layout(weights.params, weights.spec["model"]["scan"])), out)
    tokenizer, _ = build_from_spec(weights.spec)
    if to == "hf":
        from cloc_jax.convert import hf as family
    else:
        from cloc_jax.convert import open_clip as family
    heads = sorted({k.split("/")[0] for k in weights.params} - {"image", "text", "log_scale", "bias"})
    if heads:
        print(f"Not exported (no place for them in {to}): {', '.join(heads)}", file=sys.stderr)
    return family.write(weights, tokenizer, out)


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
