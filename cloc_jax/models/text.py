"""CLIP text tower: causal transformer, pooled at the end-of-text token."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax.models.layers import Dtype, Encoder, constrain, layer_norm, logical


class TextTower(nn.Module):
    """Tokens [B, L <= context_length] (0 = padding, ending in EOT) -> (embedding [B, out_dim], features [B, L, D]).

    Causal attention means the EOT token sees the whole text and never the padding after it.
    """

    vocab_size: int
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    context_length: int = 77
    out_dim: int = 512
    scan: bool = True
    remat: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        length = tokens.shape[-1]
        if length > self.context_length:
            raise ValueError(f"tokens have length {length}, the text tower takes at most {self.context_length}")
        x = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embed",
        )(tokens)
        posemb = self.param(
            "pos_embedding", logical(nn.initializers.normal(0.01), (None, "embed")), (self.context_length, self.width)
        )
        x = constrain(x + posemb[:length].astype(self.dtype), ("batch", "length", "embed"))
        x = Encoder(
            self.depth,
            self.heads,
            self.mlp_dim,
            causal=True,
            scan=self.scan,
            remat=self.remat,
            dtype=self.dtype,
            name="encoder",
        )(x)
        x = layer_norm("ln_final", self.dtype)(x)
        eot = length - 1 - jnp.argmax((tokens != 0)[:, ::-1], axis=-1)  # last non-pad token
        pooled = jnp.einsum("bld,bl->bd", x, jax.nn.one_hot(eot, length, dtype=x.dtype))
        embedding = nn.Dense(
            self.out_dim,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.normal(self.width**-0.5), ("embed", "joint")),
            name="proj",
        )(pooled)
        return embedding, x
