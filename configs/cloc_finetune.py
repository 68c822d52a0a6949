"""CLOC continued from pretrained weights (the CLOC paper's fine-tune row): the towers come from the checkpoint,
the Prompter and box head start fresh, and every architecture key (sizes, activation, tokenizer, ...) is
taken from the checkpoint, so this config leaves them at their defaults.

python launch/tpu.py --config=configs/cloc_finetune.py:init_from=hf:/ckpts/clip-vit-base-patch16 --workdir=/tmp/ft
"""

from cloc_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, init_from="", num_steps=100_000, batch_size=64, image_size=224, lr=1e-5)
    if not arg.init_from:
        raise ValueError("cloc_finetune needs init_from=SRC (an export, hf:DIR, open_clip:DIR or big_vision:FILE.npz)")
    c = base_config()
    c.init_from = arg.init_from
    c.image_size, c.batch_size, c.num_steps = arg.image_size, arg.batch_size, arg.num_steps
    # A pretrained tower moves little: AdamW at a small learning rate, the region heads learn at the same rate.
    c.optim.update(name="adamw", lr=arg.lr, warmup_steps=min(1000, arg.num_steps // 10), weight_decay=0.05)
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.lock()
    return c
