"""UMG-CLIP on cloc_tiny: RoIAlign regions, 75% of image tokens clustered away, tag losses; CPU minutes.

`--config=configs/umg_tiny.py:cluster_ratio=0` is the same model without clustering.
"""

import os

from cloc_jax.config import load_config_file, parse_arg, umg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, num_steps=1000, batch_size=64, cluster_ratio=0.75)
    steps_and_batch = f"num_steps={arg.num_steps},batch_size={arg.batch_size}"
    base = load_config_file(os.path.join(os.path.dirname(__file__), "cloc_tiny.py"), steps_and_batch)
    return umg(base, arg.cluster_ratio)
