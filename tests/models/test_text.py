import jax
import jax.numpy as jnp
import numpy as np

from cloc_jax.models.build import tower_settings
from cloc_jax.models.spec import ModelSpec, TextSpec
from cloc_jax.models.text import TextTower, pack_texts


def _model():
    text = TextSpec(width=32, depth=2, heads=2, mlp_dim=64, vocab_size=300)
    return TextTower(text, tower_settings(ModelSpec(embed_dim=16)), context_length=8)


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


def _random_texts(rng: np.random.Generator, batch: int, m: int, length: int) -> np.ndarray:
    """[B, M, L'] texts of random lengths 0..L' (0 = an empty, padded region), each ending in EOT = 1."""
    tokens = np.zeros((batch, m, length), np.int32)
    for b in range(batch):
        for i in range(m):
            n = int(rng.integers(0, length + 1))
            tokens[b, i, :n] = rng.integers(2, 300, n)
            if n:
                tokens[b, i, n - 1] = 1
    return tokens


def test_pack_texts_matches_a_loop():
    tokens = _random_texts(np.random.default_rng(0), 5, 4, 6)
    tokens[1, 2] = 0  # an empty text between two others
    pack = 4 * 6
    packed, (segments, positions, ends) = pack_texts(jnp.asarray(tokens), pack)
    for b in range(5):
        row, seg, pos, end = [], [], [], []
        for i in range(4):
            n = int((tokens[b, i] != 0).sum())
            end.append(len(row) + n - 1)
            row += list(tokens[b, i, :n])
            seg += [i] * n
            pos += list(range(n))
        rest = pack - len(row)
        np.testing.assert_array_equal(packed[b], row + [0] * rest)
        np.testing.assert_array_equal(segments[b], seg + [4] * rest)
        np.testing.assert_array_equal(positions[b], pos + [0] * rest)
        np.testing.assert_array_equal(ends[b], [e if (tokens[b, i] != 0).any() else -1 for i, e in enumerate(end)])


def test_packed_texts_embed_exactly_as_one_text_per_row():
    """Segment masking + per-text positions: packing changes the layout, never an embedding."""
    model = _model()
    tokens = _random_texts(np.random.default_rng(1), 3, 4, 8)
    tokens[0, 1] = tokens[2, 3] = 0  # empty texts between and after others
    tokens[1, 2, :8] = [*range(5, 12), 1]  # a text of the full region length
    variables = model.init(jax.random.key(0), jnp.asarray(tokens[:, 0]))
    alone, _ = model.apply(variables, jnp.asarray(tokens.reshape(12, 8)))
    lengths = (tokens != 0).sum(-1)
    packed_tokens, packing = pack_texts(jnp.asarray(tokens), int(lengths.sum(-1).max()) + 3)
    packed, _ = model.apply(variables, packed_tokens, packing)
    assert packed.shape == (3, 4, 16)
    nonempty = lengths.reshape(12) > 0
    np.testing.assert_allclose(packed.reshape(12, 16)[nonempty], alone[nonempty], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(packed.reshape(12, 16)[~nonempty], 0.0)  # empty texts pool to zeros
