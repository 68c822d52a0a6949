"""Exact gradient accumulation (`optim.accum_steps`, train/accumulate.py): k micro-batches give the whole batch's
loss and gradient for every batch-coupled loss: CLIP's softmax, SigLIP's sigmoid, CLOC's region-text loss with
negative filtering and grounding through the Prompter, UMG's RoIAlign regions, token clustering and tag losses."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from cloc_jax import sharding
from cloc_jax.data import pipeline
from cloc_jax.train import build, init_state
from cloc_jax.train.accumulate import merge, split
from cloc_jax.train.step import make_gradients
from tests.conftest import tiny_config

CASES = {  # name -> (config, overrides)
    "siglip_sigmoid": ("clip_tiny", {"model.loss": "sigmoid"}),
    "cloc": ("cloc_tiny", {"region_loss.filter_threshold": 0.5}),  # negative filtering on, at a low threshold
    "umg": ("umg_tiny", {"model.image.cluster_layer": 1}),
}


def _gradients(name: str, accum: int, devices: list, mesh_sizes: dict | None = None):
    config_name, overrides = CASES[name]
    config = tiny_config(config_name, **{"optim.accum_steps": accum, **overrides})
    config.mesh.update(mesh_sizes or dict(data=1, fsdp=1, tensor=1))
    tokenizer, model, tx = build(config)
    local = next(pipeline.train_iterator(config, tokenizer))
    mesh = sharding.make_mesh(config.mesh, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        state, _ = init_state(config, model, tx, mesh)
        fn = make_gradients(config, model, pipeline.tag_vocabulary(config, tokenizer))
        loss, parts, _, grads = jax.jit(fn)(state.params, sharding.global_batch(local, mesh))
    return float(loss), {k: float(v) for k, v in parts.items()}, jax.device_get(grads)


def _same(have, want):
    """Losses to 1e-5 relative; every gradient to 1e-5 of the largest gradient entry (float32 reordering)."""
    (loss, parts, grads), (want_loss, want_parts, want_grads) = have, want
    assert loss == pytest.approx(want_loss, rel=1e-5) and parts.keys() == want_parts.keys()
    for key in parts:
        assert parts[key] == pytest.approx(want_parts[key], rel=1e-5, abs=1e-6), key
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * largest), grads, want_grads)


def test_split_and_merge_keep_each_micro_batch_on_every_device():
    x = np.arange(16 * 3).reshape(16, 3)
    micro = split({"x": x}, 4)["x"]
    assert micro.shape == (4, 4, 3) and (micro[1, :, 0] == x[[1, 5, 9, 13], 0]).all()  # strided rows
    np.testing.assert_array_equal(merge({"x": micro})["x"], x)
    with pytest.raises(ValueError, match="accum_steps=3 does not divide the batch of 16"):
        split({"x": x}, 3)


# 2, 4 and 8 micro-batches between them (CLOC's loss holds CLIP's softmax image-text loss); CLOC's also under a
# mesh (its full-batch reference computed once)
@pytest.mark.parametrize("name, accum", [("siglip_sigmoid", 2), ("cloc", 8), ("umg", 4)])
def test_micro_batches_give_the_whole_batch_gradient(name, accum):
    want = _gradients(name, 1, jax.devices()[:1])
    _same(_gradients(name, accum, jax.devices()[:1]), want)
    if name == "cloc":  # 2 micro-batches over data 4 x fsdp 2 (8 devices): the single device's whole batch
        _same(_gradients(name, 2, jax.devices(), dict(data=4, fsdp=2, tensor=1)), want)
