"""UMG-CLIP on the CLOC B16 recipe: RoIAlign regions, 75% of image tokens clustered away, tag losses.

`--config=configs/umg_b16.py:cluster_ratio=0` is the same model without clustering.
"""

import os

from cloc_jax.config import load_config_file, parse_arg, umg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, batch_size=32_768, cluster_ratio=0.75, data="")
    base = load_config_file(
        os.path.join(os.path.dirname(__file__), "cloc_b16.py"), f"batch_size={arg.batch_size},data={arg.data}"
    )
    return umg(base, arg.cluster_ratio)
