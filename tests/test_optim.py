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
