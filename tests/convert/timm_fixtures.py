"""Tiny EVA-02-CLIP and PE-Core CLIP models built by open_clip's own `create_model` from custom model configs: the
timm towers are the families' real definitions (their registered constructors' arguments, read by calling them)
with small widths, depths and images, every parameter moved off its initial value, saved in the hub layout."""

import copy
import json
import os
from unittest import mock

import numpy as np

from cloc_jax.weights import open_clip as oc
from cloc_jax.weights import timm_towers

EMBED = 16
TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)
# name -> (the real timm model it shrinks, its small sizes, our table's entry)
TINY = {
    "eva02": (
        "eva02_base_patch16_clip_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, ref_feat_shape=(5, 5)),
        timm_towers.TimmTower("eva02_clip", 64, 2, 4, 170, 8, 32, 5),
    ),
    "pe": (
        "vit_pe_core_base_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, ref_feat_shape=(4, 4)),
        timm_towers.TimmTower("pe_core", 64, 2, 4, 256, 8, 32, 4),
    ),
    # PE-Core's blocks with layer scale, as PE's Lang and Spatial towers have it (timm's init_values=0.1)
    "pe_ls": (
        "vit_pe_core_base_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, ref_feat_shape=(4, 4), init_values=0.1),
        timm_towers.TimmTower("pe_core", 64, 2, 4, 256, 8, 32, 4, layer_scale=True),
    ),
}
_OPENAI = oc.FAMILIES["open_clip"]["image"]
PREPROCESS = {
    "eva02": dict(mean=list(_OPENAI["pixel_mean"]), std=list(_OPENAI["pixel_std"])),
    "pe": dict(mean=[0.5] * 3, std=[0.5] * 3, interpolation="bilinear", resize_mode="squash"),
}
PREPROCESS["pe_ls"] = PREPROCESS["pe"]


def family_args(real: str) -> dict:
    """The keyword arguments timm's registered constructor `real` builds its Eva with."""
    import timm.models.eva as eva

    seen = {}
    with mock.patch.object(eva, "_create_eva", lambda variant, pretrained=False, **kw: seen.update(kw)):
        getattr(eva, real)()
    return seen


def register(name: str) -> str:
    """Registers the tiny tower `name` with timm and with cloc_jax; returns its timm model name."""
    import timm
    import timm.models.eva as eva

    real, small, tower = TINY[name]
    timm_name = f"{name}_tiny_test_patch8_32"
    if timm_name not in timm.list_models(timm_name):
        args = {**family_args(real), **small}

        def constructor(pretrained=False, **kwargs):
            return eva._create_eva(timm_name, pretrained=pretrained, **{**args, **kwargs})

        constructor.__name__ = timm_name
        timm.models.register_model(constructor)
    timm_towers.register(timm_name, tower)
    return timm_name


def model_config(name: str) -> dict:
    timm_name = register(name)
    vision = timm_towers.vision_config(timm_name)
    return dict(embed_dim=EMBED, vision_cfg=vision, text_cfg=dict(TEXT), custom_text=True)


def build(name: str, seed: int = 0):
    """open_clip.create_model of the tiny model (its config added as open_clip adds any), perturbed, eval mode."""
    import open_clip
    import torch

    cfg = model_config(name)
    folder = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cloc_jax_open_clip_configs_{os.getpid()}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}-tiny-test.json"), "w") as f:
        json.dump(copy.deepcopy(cfg), f)
    open_clip.add_model_config(folder)
    torch.manual_seed(seed)  # the same model every call
    model = open_clip.create_model(f"{name}-tiny-test")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save(directory: str, name: str, state=None) -> str:
    """The hub layout: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, oc.CONFIG), "w") as f:
        json.dump(dict(model_cfg=model_config(name), preprocess_cfg=PREPROCESS[name]), f)
    state = build(name).state_dict() if state is None else state
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, oc.WEIGHTS[0]))
    return directory


def pixels(images: np.ndarray, name: str):
    """Our [-1, 1] images -> the model's normalised NCHW tensor."""
    import torch

    mean, std = (np.array(PREPROCESS[name][k], np.float32) for k in ("mean", "std"))
    return torch.tensor((((images + 1) / 2 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
