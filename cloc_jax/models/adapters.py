"""Convpass adapters (Jie & Deng 2022), UMG-CLIP's parameter-efficient tuning for downstream tasks.

A Convpass module runs beside a block's attention and beside its MLP: 1x1 conv down to a small width,
GELU, 3x3 conv over the token grid (what plain adapters lack: spatial context), GELU, 1x1 conv back
up, scaled by s = 0.1. The up-projection starts at zero, so adding adapters leaves a pretrained
model's outputs unchanged until they train.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

logical = nn.with_logical_partitioning


class Convpass(nn.Module):
    """x [B, P + h*w, D] (P prefix tokens, then the grid row-major) -> [B, P + h*w, D]."""

    dim: int
    grid: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        h, w = self.grid
        prefix = tokens - h * w
        down = nn.Dense(
            self.dim,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", None)),
            bias_init=logical(nn.initializers.zeros, (None,)),
            name="down",
        )(x)
        down = nn.gelu(down)
        conv = nn.Conv(
            self.dim,
            (3, 3),
            padding="SAME",
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), (None, None, None, None)),
            bias_init=logical(nn.initializers.zeros, (None,)),
            name="conv",
        )
        spatial = conv(down[:, prefix:].reshape(batch, h, w, self.dim)).reshape(batch, h * w, self.dim)
        first = conv(down[:, :prefix].reshape(batch * prefix, 1, 1, self.dim)).reshape(batch, prefix, self.dim)
        mixed = nn.gelu(jnp.concatenate([first, spatial], axis=1))  # a prefix token is a 1x1 image
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.zeros, (None, "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="up",
        )(mixed)
