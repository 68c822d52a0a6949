"""UMG-CLIP on the CLOC L14 recipe: RoIAlign regions, 75% of image tokens clustered away, tag losses.

`--config=configs/umg_l14.py:cluster_ratio=0` is the same model without clustering. UMG-CLIP starts from
EVA-02-CLIP (open_clip's EVA02-L-14, hub folder timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k, downloaded):

    python launch/tpu.py --config=configs/umg_l14.py:init_from=open_clip:/ckpts/EVA02-L-14,image_size=224 \
        --config.data.train=SPEC --workdir=/ckpts/umg_l14

takes its towers, sizes and tokenizer (RoIAlign, clustering and tag heads start fresh; the first two blocks run
before the clustering point, the rest after it).
"""

import os

from cloc_jax.config import load_config_file, parse_arg, umg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, batch_size=32_768, cluster_ratio=0.75, data="", init_from="", image_size=336)
    base = load_config_file(
        os.path.join(os.path.dirname(__file__), "cloc_l14.py"),
        f"batch_size={arg.batch_size},data={arg.data},init_from={arg.init_from},image_size={arg.image_size}",
    )
    return umg(base, arg.cluster_ratio)
