"""CLOC ViT-L/14 at 336 px, the paper's recipe (1024 TPU v5p chips, batch 32,768).

Real data: --config.data.train=SPEC [--config.data.heldout=SPEC] --config.tokenizer.path=<T5's SentencePiece
model, gs://t5-data/vocabs/cc_en.32000/sentencepiece.model copied locally>; `:data=scenes` is a smoke test on
the embedded scenes. The paper trains with AdamW, LAMB is our default: `--config.optim.name=adamw` switches.
`:init_from=SRC` starts from a checkpoint (its towers, sizes and tokenizer; see configs/cloc_pe_l14.py).
"""

from cloc_jax.config import paper_config, parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, batch_size=32_768, image_size=336, data="", init_from="")
    text = dict(width=768, depth=12, heads=12, mlp_dim=3072)
    c = paper_config("L/14", arg.image_size, text, embed_dim=768, data=arg.data, init_from=arg.init_from)
    c.batch_size = arg.batch_size
    # 95 GiB of v5p HBM hold every activation of the backward pass (54.4 GiB a chip on 1,024 chips): no
    # recomputation. XLA's cost model: MFU 0.56 against 0.51 with remat=dots_no_batch. 16 GiB parts need remat.
    c.model.remat = "none"
    return c
