"""2D rotary position embeddings on image tokens, as timm computes them for EVA-02 and Perception Encoder
(timm.layers.pos_embed_sincos: RotaryEmbeddingCat with `in_pixels=False`, interleaved rotation).

Each patch token has a 2D position: its cell (row i, column j) of an h x w grid, plus `offset`, rescaled to a
reference grid (`ref`: timm's `ref_feat_shape`, the pretraining grid, so a higher resolution spreads the same
position range over more tokens). `order` says which coordinate comes first ("yx": timm's 'ij' indexing, EVA-02;
"xy": PE). A head of width K rotates K/4 pairs by the first coordinate and K/4 by the second, at frequencies
temperature^(-f / (K/4)). Prefix tokens (the class token) are not rotated. Positions are data, not parameters:
a merged token (token clustering) takes its members' mean position.
"""

import jax
import jax.numpy as jnp
import numpy as np

ORDERS = ("yx", "xy")


def grid_positions(grid: tuple[int, int], ref: int, offset: float = 0.0, order: str = "yx") -> np.ndarray:
    """Positions [h * w, 2] of a row-major token grid, in rotary units (the reference grid's)."""
    if order not in ORDERS:
        raise ValueError(f"model.image.rope_order={order!r}; choose one of {ORDERS}")
    h, w = grid
    rows = (np.arange(h, dtype=np.float32) + np.float32(offset)) / np.float32(h) * np.float32(ref)
    cols = (np.arange(w, dtype=np.float32) + np.float32(offset)) / np.float32(w) * np.float32(ref)
    y, x = np.meshgrid(rows, cols, indexing="ij")
    first, second = (y, x) if order == "yx" else (x, y)
    return np.stack([first.ravel(), second.ravel()], -1)


def tables(positions: jax.Array, head_dim: int, prefix: int, temperature: float = 10000.0):
    """Positions [B, N, 2] (B may be 1) -> (cos, sin), each [B, prefix + N, 1, head_dim], that `rotate` applies;
    the `prefix` tokens first get cos 1 and sin 0 (no rotation)."""
    if head_dim % 4:
        raise ValueError(f"2D rotary embeddings need a head width divisible by 4, got {head_dim}")
    bands = 1.0 / temperature ** (np.arange(head_dim // 4, dtype=np.float32) / np.float32(head_dim // 4))
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(bands, jnp.float32)  # [B, N, 2, K/4]
    angles = angles.reshape(*angles.shape[:2], head_dim // 2)  # first coordinate's bands, then the second's
    angles = jnp.repeat(angles, 2, axis=-1)  # interleaved: each angle rotates one (even, odd) pair
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pad = ((0, 0), (prefix, 0), (0, 0))
    cos, sin = jnp.pad(cos, pad, constant_values=1.0), jnp.pad(sin, pad)
    return cos[:, :, None], sin[:, :, None]


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, K] rotated pairwise: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in float32, cast back."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(jnp.float32) * cos + turned * sin).astype(x.dtype)
