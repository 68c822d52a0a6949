import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cloc_jax.optim import decay_mask, make_optimizer, schedule
from tests.conftest import tiny_config


def _params():
    return {
        "image": {"encoder": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "pos_embedding": jnp.ones((2, 3))},
        "text": {"ln": {"scale": jnp.ones(3), "bias": jnp.ones(3)}, "proj": {"kernel": jnp.ones((3, 2))}},
        "log_scale": jnp.array(2.0),
    }


def test_weight_decay_skips_norms_biases_posemb_and_temperature():
    flat = flax.traverse_util.flatten_dict(decay_mask(_params()), sep="/")
    assert flat == {
        "image/encoder/kernel": True,
        "image/encoder/bias": False,
        "image/pos_embedding": False,
        "text/ln/scale": False,
        "text/ln/bias": False,
        "text/proj/kernel": True,
        "log_scale": False,
    }


def test_warmup_then_cosine():
    optim = tiny_config().optim
    optim.update(lr=1.0, warmup_steps=10, end_lr_ratio=0.1)
    lr = schedule(optim, 110, optim.lr)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-5)
    assert float(lr(110)) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_tower_learning_rates_and_freezing(name):
    optim = tiny_config().optim
    optim.update(name=name, warmup_steps=0, image_lr_mult=0.0, text_lr_mult=1.0, clip_norm=1e9)
    tx = make_optimizer(optim, 100)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert all((a == b).all() for a, b in zip(jax.tree.leaves(new["image"]), jax.tree.leaves(params["image"])))
    assert all((a != b).any() for a, b in zip(jax.tree.leaves(new["text"]), jax.tree.leaves(params["text"])))
    assert new["log_scale"] != params["log_scale"]


def test_gradients_are_clipped_by_global_norm_before_the_moments():
    optim = tiny_config().optim
    optim.update(name="adamw", warmup_steps=0, clip_norm=0.5, b1=0.9)
    tx = make_optimizer(optim, 100)
    params = {"log_scale": jnp.array(0.0), "text": {"w": jnp.zeros(2)}}
    grads = {"log_scale": jnp.array(30.0), "text": {"w": jnp.array([40.0, 0.0])}}  # global norm 50
    _, state = tx.update(grads, tx.init(params), params)
    moments = [v for _, v in optax.tree_utils.tree_get_all_with_path(state, "mu")]
    shared = [m["log_scale"] for m in moments if not isinstance(m["log_scale"], optax.MaskedNode)]
    assert float(shared[0]) == pytest.approx(0.1 * 30.0 * 0.5 / 50.0)


def test_unknown_optimizer():
    optim = tiny_config().optim
    optim.name = "sgd"
    with pytest.raises(ValueError, match=r"optim\.name='sgd'"):
        make_optimizer(optim, 10).init(_params())


def _lamb(**overrides):
    optim = tiny_config().optim
    optim.update({"name": "lamb", "warmup_steps": 0, "end_lr_ratio": 1.0, "clip_norm": 1e9, "weight_decay": 0.0})
    optim.update(overrides)
    return make_optimizer(optim, 100)


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def _tree(flat: dict) -> dict:
    return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def test_lamb_trust_ratio_is_per_layer_for_scanned_layers():
    """The issue's case: two stacked layers with weight norms 10 and 0.01 and equal gradients. Adam's first
    step is lr x sign(g) per element, so LAMB's per-layer step has norm lr x |w_layer|."""
    lr = 1e-3
    w = np.stack([np.full((2, 2), 5.0), np.full((2, 2), 0.005)])  # norms 10 and 0.01
    params = {"text": {"encoder": {"blocks": {"mlp": {"kernel": jnp.asarray(w)}}}}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = _lamb(lr=lr)
    updates, _ = tx.update(grads, tx.init(params), params)
    step = np.asarray(updates["text"]["encoder"]["blocks"]["mlp"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(step.reshape(2, -1), axis=1), [lr * 10, lr * 0.01], rtol=1e-4)
    # optax's whole-array ratio gives both layers the same step: what scanning used to train
    whole = optax.lamb(lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0)
    old, _ = whole.update(grads, whole.init(params), params)
    old = np.asarray(old["text"]["encoder"]["blocks"]["mlp"]["kernel"])
    assert np.linalg.norm(old[0]) == pytest.approx(np.linalg.norm(old[1]), rel=1e-4)


def test_one_lamb_step_scanned_equals_unrolled():
    """A real model's parameters, two LAMB steps (weight decay on) with layers scanned and unrolled."""
    from cloc_jax.models.build import init_params
    from cloc_jax.models.spec import from_config
    from cloc_jax.train import build
    from cloc_jax.weights import layout

    config = tiny_config("umg_tiny_pet")
    config.model.image.adapter_dim = 4
    _, model, _ = build(config)
    init = jax.jit(lambda rng: flax.linen.unbox(init_params(model, from_config(config), rng)))
    flat = _flat(init(jax.random.key(0)))
    rng = np.random.default_rng(0)
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()} for _ in range(2)]
    tx = _lamb(lr=1e-2, weight_decay=0.1)

    @jax.jit
    def run(params, grads):
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params

    scanned = layout.unrolled(_flat(run(_tree(flat), [_tree(g) for g in grads])))
    unrolled = _flat(run(_tree(layout.unrolled(flat)), [_tree(layout.unrolled(g)) for g in grads]))
    assert set(scanned) == set(unrolled) and any("/block_1/" in k for k in unrolled)
    for key, value in unrolled.items():
        np.testing.assert_allclose(scanned[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    moved = [k for k in unrolled if np.abs(unrolled[k] - layout.unrolled(flat)[k]).max() > 1e-4]
    assert len(moved) == len(unrolled)  # every array moved: nothing is frozen by accident


def test_lamb_leaves_scalars_vectors_and_zero_initialised_arrays_to_adam():
    """No trust ratio for the temperature, biases and arrays that start at zero: their first steps are Adam's
    (lr x sign(g) per element), whatever their magnitude; a matrix's step is lr x |w|."""
    lr = 1e-2
    params = {
        "log_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32),
        "bias": jnp.asarray(-10.0),
        "text": {
            "ln": {"scale": jnp.full(4, 3.0)},
            "adapter": {"up": {"kernel": jnp.zeros((8, 128))}},
            "mlp": {"kernel": jnp.full((4, 4), 0.5)},
        },
    }
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    tx = _lamb(lr=lr)
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, first)
    for _ in range(19):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for path in ("log_scale", "bias", "text/ln/scale", "text/adapter/up/kernel"):
        np.testing.assert_allclose(_flat(first)[path], -lr, rtol=1e-4, err_msg=path)
    np.testing.assert_allclose(np.linalg.norm(_flat(first)["text/mlp/kernel"]), lr * 2.0, rtol=1e-4)
    # after 20 steps the zero-initialised matrix has the norm AdamW would give it (20 x lr per element)
    up = np.asarray(params["text"]["adapter"]["up"]["kernel"])
    assert np.linalg.norm(up) == pytest.approx(20 * lr * np.sqrt(up.size), rel=1e-3)


def test_logit_scale_is_clamped_on_the_parameter_and_can_come_back_down():
    from cloc_jax.train import build, init_state, make_train_step

    config = tiny_config("clip_tiny", **{"optim.name": "adamw", "optim.lr": 1.0, "optim.warmup_steps": 0})
    _, model, tx = build(config)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(config.axis_rules):
        state, _ = init_state(config, model, tx, mesh)
        state = state.replace(params={**state.params, "log_scale": jnp.asarray(np.log(500.0), jnp.float32)})
        batch = jax.tree.map(jnp.asarray, _scene_batch(config))
        state, metrics = jax.jit(make_train_step(config, model, tx))(state, batch)
    # the forward pass saw 500 (no clamp there: the gradient is not cut), the update then clamped at 100
    assert float(metrics["temperature"]) == pytest.approx(1 / 500, rel=1e-5)
    assert float(state.params["log_scale"]) == pytest.approx(np.log(100.0), rel=1e-6)
    moments = [v for _, v in optax.tree_utils.tree_get_all_with_path(state.opt_state, "mu")]
    shared = [m["log_scale"] for m in moments if not isinstance(m["log_scale"], optax.MaskedNode)]
    assert abs(float(shared[0])) > 0  # a gradient reached the temperature: it can move back down


def _scene_batch(config) -> dict:
    from cloc_jax import tokenizers
    from cloc_jax.data import pipeline

    tokenizer = tokenizers.from_spec(config.tokenizer.to_dict())
    return next(pipeline.train_iterator(config, tokenizer, pipeline.DataStats()))
