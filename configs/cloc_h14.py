"""CLOC ViT-H/14 at 336 px, the paper's recipe.

Real data: --config.data.train=SPEC [--config.data.heldout=SPEC] --config.tokenizer.path=<T5's SentencePiece
model, gs://t5-data/vocabs/cc_en.32000/sentencepiece.model copied locally>; `:data=scenes` is a smoke test on
the embedded scenes. The paper trains with AdamW, LAMB is our default: `--config.optim.name=adamw` switches.
"""

from cloc_jax.config import paper_config, parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, batch_size=32_768, image_size=336, data="")
    c = paper_config(
        "H/14", arg.image_size, dict(width=1024, depth=24, heads=16, mlp_dim=4096), embed_dim=1024, data=arg.data
    )
    c.batch_size = arg.batch_size
    return c
