"""CLOC continued from Meta's Perception Encoder, PE-Core-L/14 at 336 px (open_clip's PE-Core-L-14-336, hub
folder timm/PE-Core-L-14-336, downloaded): the towers, their sizes and the tokenizer come from the checkpoint, the
Prompter and box head start fresh, and the region losses teach the encoder regions on top of PE's image level.

    python launch/tpu.py --config=configs/cloc_pe_l14.py:init_from=open_clip:/ckpts/PE-Core-L-14-336 \
        --config.data.train=SPEC --workdir=/ckpts/cloc_pe_l14

The CLOC L14 layout (bf16 activations, FSDP) at a continuation's optimizer: AdamW at a small learning rate, as
configs/cloc_finetune.py. PE's text tower is wider than CLOC's (1024 x 24): matmul outputs are saved for the
backward pass (remat), not every activation as cloc_l14 does.
"""

import os

from cloc_jax.config import load_config_file, parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, init_from="", batch_size=32_768, num_steps=20_000, lr=1e-5, data="")
    if not arg.init_from:
        raise ValueError("cloc_pe_l14 needs init_from=open_clip:DIR (a PE-Core hub folder)")
    c = load_config_file(
        os.path.join(os.path.dirname(__file__), "cloc_l14.py"),
        f"batch_size={arg.batch_size},data={arg.data},init_from={arg.init_from},image_size=336",
    )
    c.unlock()
    c.num_steps = arg.num_steps
    c.model.remat = "dots_no_batch"
    c.optim.update(name="adamw", lr=arg.lr, warmup_steps=min(1000, arg.num_steps // 10), weight_decay=0.05)
    c.lock()
    return c
