"""One training step gives the same result on every mesh, and the ring losses equal the global ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloc_jax import losses, sharding
from cloc_jax.data import pipeline
from cloc_jax.models.build import model_inputs
from cloc_jax.train import build, init_state, make_train_step
from tests.conftest import tiny_config


def one_step(mesh_sizes: dict, devices: list, contrastive: str = "global"):
    """(loss, parameters before, parameters after) of one step on a fresh state, as numpy."""
    config = tiny_config(**{"optim.warmup_steps": 0, "contrastive": contrastive})
    config.mesh.update(mesh_sizes)
    tokenizer, model, tx = build(config)
    local = next(pipeline.train_iterator(config, tokenizer))
    mesh = sharding.make_mesh(config.mesh, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        state, _ = init_state(config, model, tx, mesh)
        before = jax.device_get(state.params)
        state, metrics = jax.jit(make_train_step(config, model, tx))(state, sharding.global_batch(local, mesh))
    return float(metrics["loss"]), before, jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device():
    return one_step(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.mark.parametrize(
    "sizes,contrastive",
    [
        ((8, 1, 1), "global"),
        # Two axes of size > 1, not three: a whole step on (2, 2, 2) issues FSDP all-gathers and tensor
        # all-reduces that XLA:CPU's thunk executor can order differently per simulated device (CI hung);
        # the ring losses alone run on (2, 2, 2) below. TPUs issue collectives in one program order.
        ((4, 1, 2), "global"),
        ((1, 8, 1), "global"),
        ((1, 1, 8), "global"),
        # The ring inside a whole step runs data-parallel only: beside FSDP all-gathers, XLA:CPU's thunk
        # executor can start a simulated device's ring permute before its all-gather and another
        # device's the other way round, which deadlocks (seen in CI). TPUs and GPUs issue collectives in
        # one program order. The ring itself is checked on multi-axis meshes below.
        ((8, 1, 1), "ring"),
    ],
)
def test_one_step_matches_a_single_device(single_device, sizes, contrastive):
    """Same initial parameters (same key, sharding does not change values) and the same batch; only
    the order of floating-point reductions differs, so f32 agreement is to ~1e-6 relative. Updates are
    compared at 1e-3 of the largest update (LAMB moves weights by ~lr): a wrong gradient would be off
    by a whole update, while the key biases (exactly zero gradient: softmax ignores a per-query
    constant) move by normalised reduction noise of ~1e-7 that differs from mesh to mesh."""
    loss, before, after = one_step(dict(zip(("data", "fsdp", "tensor"), sizes)), jax.devices(), contrastive)
    ref_loss, ref_before, ref_after = single_device
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    jax.tree.map(np.testing.assert_array_equal, before, ref_before)
    largest = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref_after), jax.tree.leaves(ref_before)))
    assert largest > 1e-4
    jax.tree.map(lambda got, ref: np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3 * largest), after, ref_after)


def _embeddings(rows=32, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    za, zb = unit(rng.normal(size=(rows, dim))), unit(rng.normal(size=(rows, dim)))
    zb[5] = zb[9] = zb[20]  # three regions described by the same text: filtered as each other's negatives
    valid = rng.random(rows) > 0.25
    valid[[5, 9, 20]] = True
    return jnp.asarray(za, jnp.float32), jnp.asarray(zb, jnp.float32), jnp.asarray(valid)


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_ring_softmax_equals_the_global_loss_in_value_and_gradient(sizes, threshold):
    za, zb, valid = _embeddings()
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), sizes)))
    global_fn = lambda a, b, s: losses.region_text_loss(a, b, valid, s, 2.0 if threshold is None else threshold)  # noqa: E731
    ring_fn = lambda a, b, s: losses.ring_softmax_loss(a, b, valid, s, threshold)  # noqa: E731
    with jax.set_mesh(mesh):
        want, want_grads = jax.value_and_grad(global_fn, argnums=(0, 1, 2))(za, zb, 7.0)
        got, got_grads = jax.jit(jax.value_and_grad(ring_fn, argnums=(0, 1, 2)))(za, zb, 7.0)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    if threshold is not None:  # the filter is really applied on the ring
        unfiltered = jax.jit(lambda a, b: losses.ring_softmax_loss(a, b, valid, 7.0, None))
        with jax.set_mesh(mesh):
            assert abs(float(unfiltered(za, zb)) - float(got)) > 1e-3


def test_ring_image_text_losses_equal_the_global_ones():
    za, zb, _ = _embeddings(seed=1)
    mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
    for out in (dict(zimg=za, ztxt=zb, scale=9.0), dict(zimg=za, ztxt=zb, scale=9.0, bias=-4.0)):
        grad_fn = lambda impl: jax.value_and_grad(  # noqa: E731
            lambda o: losses.image_text_loss(o, impl)
        )
        with jax.set_mesh(mesh):
            want, want_grads = grad_fn("global")(out)
            got, got_grads = jax.jit(grad_fn("ring"))(out)
        assert float(got) == pytest.approx(float(want), rel=1e-6)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got_grads, want_grads)


def test_ring_loss_without_a_mesh_is_one_line():
    za, zb, valid = _embeddings()
    with pytest.raises(ValueError, match="needs a mesh"):
        losses.ring_softmax_loss(za, zb, valid, 1.0)
    with pytest.raises(ValueError, match="contrastive='chunked'"):
        losses.image_text_loss(dict(zimg=za, ztxt=zb, scale=1.0), "chunked")


def test_bf16_activations_keep_float32_parameters_and_optimizer_state():
    config = tiny_config(**{"model.dtype": "bfloat16", "model.remat": "dots_no_batch"})
    tokenizer, model, tx = build(config)
    local = next(pipeline.train_iterator(config, tokenizer))
    # One device: this test is about dtypes. On 8 simulated CPU devices XLA:CPU sometimes orders this
    # FSDP step's collectives differently per device and hangs (seen in CI); sharded training steps are
    # tested by test_one_step_matches_a_single_device and the ring tests above.
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        state, _ = init_state(config, model, tx, mesh)
        batch = sharding.global_batch(local, mesh)
        out = jax.jit(lambda p, b: model.apply({"params": p}, **model_inputs(model, b)))(state.params, batch)
        state, metrics = jax.jit(make_train_step(config, model, tx))(state, batch)
    assert out["grid"].dtype == jnp.bfloat16  # activations
    assert out["zimg"].dtype == out["zregion"].dtype == jnp.float32  # embeddings and losses in f32
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert np.isfinite(float(metrics["loss"]))
