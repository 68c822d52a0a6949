import jax
import jax.numpy as jnp
import numpy as np

from cloc_jax.models.text import TextTower


def _model():
    return TextTower(vocab_size=300, width=32, depth=2, heads=2, mlp_dim=64, context_length=8, out_dim=16)


def test_shapes_and_causal_features_ignore_what_follows():
    model = _model()
    tokens = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0], [9, 1, 0, 0, 0, 0, 0, 0]], jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    emb, feats = model.apply(variables, tokens)
    assert emb.shape == (2, 16) and feats.shape == (2, 8, 32)
    # Causal attention: a later token cannot change features up to and including EOT.
    _, feats2 = model.apply(variables, tokens.at[0, 5].set(42))
    np.testing.assert_allclose(feats2[0, :4], feats[0, :4], atol=1e-6)
    assert not np.allclose(feats2[0, 5], feats[0, 5])


def test_pooled_feature_is_the_eot_position():
    model = _model()
    tokens = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0]], jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    emb, feats = model.apply(variables, tokens)
    proj = variables["params"]["proj"]["kernel"].value
    np.testing.assert_allclose(emb[0], feats[0, 3] @ proj, rtol=1e-5, atol=1e-6)


def test_pooling_is_at_the_last_non_padding_token_even_with_inner_zeros():
    model = _model()
    tokens = jnp.array([[5, 0, 7, 1, 0, 0, 0, 0]], jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    emb, feats = model.apply(variables, tokens)
    np.testing.assert_allclose(emb[0], feats[0, 3] @ variables["params"]["proj"]["kernel"].value, rtol=1e-5, atol=1e-6)


def test_earlier_tokens_change_the_embedding():
    model = _model()
    tokens = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0]], jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    a, _ = model.apply(variables, tokens)
    b, _ = model.apply(variables, tokens.at[0, 0].set(50))
    assert not np.allclose(a, b)
