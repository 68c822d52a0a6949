"""UMG-CLIP's dense adaptation at paper scale: COCO Panoptic, an L/14 backbone frozen (Convpass PET with `pet=true`),
FC-CLIP's decoder size (250 queries, 256 wide, 9 layers: 3 rounds over the pyramid's 3 levels), 896 px crops
(the nearest multiple of 14 to FC-CLIP's 1,024; a 64 x 64 token grid), batch 16.

    python launch/tpu.py --config=configs/umg_l14_seg.py:init_from=/ckpts/umg_l14_export,pet=true \
        --config.data.train='coco_panoptic:/data/coco/annotations/panoptic_train2017.json@/data/coco/train2017' \
        --config.data.heldout='coco_panoptic:/data/coco/annotations/panoptic_val2017.json@/data/coco/val2017' \
        --workdir=/ckpts/umg_l14_seg
    python launch/tpu.py --config=configs/umg_l14_seg.py:backbone=clip,pet=true --aot_topology=v5p:2x2x2

`backbone=umg` (UMG-CLIP L/14), `cloc` (CLOC L/14) or `clip` (an L/14 CLIP: `init_from=hf:DIR` or `open_clip:DIR`
of an imported one, whose architecture the run adopts; ahead of time the config's own L/14 CLIP stands in, the
same tower sizes). COCO Panoptic's segments, stuff included, are the records' regions (one per stuff class per
image), so no label-map stuff targets are added: 100 regions an image, 133 classes.
"""

import os

from cloc_jax.config import backbone_config, dense_adaptation, parse_arg

BACKBONES = {"umg": "umg_l14.py", "cloc": "cloc_l14.py", "clip": "clip_l14.py"}


def get_config(arg: str | None = None):
    arg = parse_arg(arg, backbone="umg", init_from="", pet=False, batch_size=16, image_size=896, num_steps=368_750)
    base = backbone_config(os.path.dirname(__file__), BACKBONES, arg.backbone, f"init_from={arg.init_from}")
    c = dense_adaptation(base, arg.pet, adapter_dim=64)
    c.unlock()
    c.batch_size, c.image_size, c.num_steps = arg.batch_size, arg.image_size, arg.num_steps  # 50 epochs of 118k
    c.mesh.update(data=-1, fsdp=1, max_fsdp=0)  # 16 images over a few chips: data parallel, the backbone replicated
    c.optim.update(name="adamw", lr=1e-4, b2=0.999, weight_decay=0.05, warmup_steps=1500, clip_norm=0.01)
    c.data.update(train="", heldout="", max_regions=100, eval_max_regions=100)
    c.dense.update(num_queries=250, dim=256, layers=9, heads=8, mlp_dim=2048, num_classes=133)
    c.dense.update(object_threshold=0.8, overlap_threshold=0.8, templates=("a photo of a {}.",))
    c.lock()
    return c
