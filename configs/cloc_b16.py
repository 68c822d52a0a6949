"""CLOC ViT-B/16 at 224 px, the paper's recipe. `--config=configs/cloc_b16.py:batch_size=4096`.

Real data: --config.data.train=SPEC [--config.data.heldout=SPEC] --config.tokenizer.path=<T5's SentencePiece
model, gs://t5-data/vocabs/cc_en.32000/sentencepiece.model copied locally>; `:data=scenes` is a smoke test on
the embedded scenes. The paper trains with AdamW, LAMB is our default: `--config.optim.name=adamw` switches.
"""

from cloc_jax.config import paper_config, parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, batch_size=32_768, image_size=224, data="")
    c = paper_config(
        "B/16", arg.image_size, dict(width=512, depth=12, heads=8, mlp_dim=2048), embed_dim=512, data=arg.data
    )
    c.batch_size = arg.batch_size
    # Laid out for the paper's v5p pod, like cloc_l14: no recomputation (XLA's cost model: 0.034 s/step against
    # 0.042 with remat=dots_no_batch, 14.7 GiB a chip). 16 GiB parts (v4, v5e) need remat=dots_no_batch.
    c.model.remat = "none"
    return c
