"""Dense adaptation of a trained tiny model on the embedded scenes: backbone frozen, an open-vocabulary mask
decoder (and Convpass adapters with `pet=true`) trained on the scenes' instance masks and background; held-out
mIoU and PQ at the end (the five held-out colour-shape combinations are unseen classes: FC-CLIP's ensemble).

python -m cloc_jax.export --workdir=/tmp/umg_tiny --out=/tmp/umg_tiny_export
python launch/tpu.py --config=configs/umg_tiny_seg.py:init_from=/tmp/umg_tiny_export,pet=true --workdir=/tmp/umg_seg

`backbone=cloc` or `clip` reads cloc_tiny / clip_tiny exports the same way; `image_size=80` adapts at 80 px
(the token grid must stay even). The defaults are one row of the README's table (bench/dense_table.py).
"""

import os

from cloc_jax.config import SCENE_TEMPLATES, backbone_config, dense_adaptation, parse_arg
from cloc_jax.data import scenes

BACKBONES = {"umg": "umg_tiny.py", "cloc": "cloc_tiny.py", "clip": "clip_tiny.py"}


def get_config(arg: str | None = None):
    arg = parse_arg(arg, backbone="umg", init_from="", pet=False, num_steps=500, batch_size=16, image_size=64)
    steps_and_batch = f"num_steps={arg.num_steps},batch_size={arg.batch_size}"
    c = dense_adaptation(backbone_config(os.path.dirname(__file__), BACKBONES, arg.backbone, steps_and_batch), arg.pet)
    c.unlock()
    c.image_size = arg.image_size
    c.init_from = arg.init_from
    c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.05, name="adamw")
    # prompts as the region captions read ("large red circle"): the bare name is out of the tiny text tower's
    # distribution (its class names' mean cosine 0.96 bare, 0.13 with these)
    c.dense.update(stuff_classes=("background",), unseen_classes=tuple(sorted(scenes.HELDOUT_COMBOS)))
    c.dense.templates = SCENE_TEMPLATES
    c.data.heldout_size = 256
    c.eval_batch_size = 64
    c.log_every = 50
    c.checkpoint_every = 200
    c.lock()
    return c
