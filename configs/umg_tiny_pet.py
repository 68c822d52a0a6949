"""Parameter-efficient adaptation of a trained umg_tiny: Convpass adapters in every image block, the
backbone frozen; only the adapters and the image head (attention-pooling head, projection) train.

python -m cloc_jax.export --workdir=/tmp/umg_tiny --out=/tmp/umg_tiny_export
python launch/tpu.py --config=configs/umg_tiny_pet.py:init_from=/tmp/umg_tiny_export --workdir=/tmp/umg_pet
"""

import os

from cloc_jax.config import load_config_file, parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, num_steps=300, init_from="", adapter_dim=8)
    c = load_config_file(os.path.join(os.path.dirname(__file__), "umg_tiny.py"), f"num_steps={arg.num_steps}")
    c.model.image.update(cluster_ratio=0.0, adapter_dim=arg.adapter_dim)  # adapters need the full token grid
    c.optim.update(trainable=("adapter", "image/map_head", "image/proj"), warmup_steps=30)
    c.init_from = arg.init_from
    return c
