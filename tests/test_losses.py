"""Both contrastive losses against float64 NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloc_jax.losses import image_text_loss, sigmoid_siglip_loss, softmax_clip_loss


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def softmax_reference(zi, zt, scale):
    n = len(zi)
    total = 0.0
    for i in range(n):
        row = [scale * zi[i] @ zt[j] for j in range(n)]
        col = [scale * zi[j] @ zt[i] for j in range(n)]
        total += -row[i] + np.log(np.sum(np.exp(row)))
        total += -col[i] + np.log(np.sum(np.exp(col)))
    return total / (2 * n)


def sigmoid_reference(zi, zt, scale, bias):
    n = len(zi)
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            logit = scale * zi[i] @ zt[j] + bias
            total += np.log1p(np.exp(-label * logit))
    return total / n


@pytest.mark.parametrize("n,scale", [(1, 10.0), (7, 14.3), (16, 100.0)])
def test_softmax_clip_matches_reference(n, scale):
    rng = np.random.default_rng(n)
    zi, zt = _unit(rng, n, 12), _unit(rng, n, 12)
    got = softmax_clip_loss(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), scale)
    assert float(got) == pytest.approx(softmax_reference(zi, zt, scale), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("n,scale,bias", [(1, 10.0, -10.0), (9, 3.0, 2.5), (16, 30.0, -5.0)])
def test_sigmoid_siglip_matches_reference(n, scale, bias):
    rng = np.random.default_rng(n + 100)
    zi, zt = _unit(rng, n, 12), _unit(rng, n, 12)
    got = sigmoid_siglip_loss(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), scale, bias)
    assert float(got) == pytest.approx(sigmoid_reference(zi, zt, scale, bias), rel=1e-5, abs=1e-5)


def test_gradients_match_float64_finite_differences():
    rng = np.random.default_rng(0)
    zi, zt = _unit(rng, 5, 4), _unit(rng, 5, 4)
    grad = jax.grad(lambda a: softmax_clip_loss(a, jnp.asarray(zt, jnp.float32), 5.0))(jnp.asarray(zi, jnp.float32))
    eps, numeric = 1e-6, np.zeros_like(zi)
    for idx in np.ndindex(zi.shape):
        up, down = zi.copy(), zi.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (softmax_reference(up, zt, 5.0) - softmax_reference(down, zt, 5.0)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-4)


def test_dispatch_on_bias():
    rng = np.random.default_rng(1)
    zi, zt = jnp.asarray(_unit(rng, 4, 8)), jnp.asarray(_unit(rng, 4, 8))
    assert image_text_loss(dict(zimg=zi, ztxt=zt, scale=5.0)) == softmax_clip_loss(zi, zt, 5.0)
    with_bias = image_text_loss(dict(zimg=zi, ztxt=zt, scale=5.0, bias=-1.0))
    assert with_bias == sigmoid_siglip_loss(zi, zt, 5.0, -1.0)
