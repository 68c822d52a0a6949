"""CLIP text tower: causal transformer, pooled at the end-of-text token.

Region texts are short and most of an [M, L'] block per image is padding (and whole padded regions);
`pack_texts` lays an image's texts end to end in one row instead (MaxText-style sequence packing), so
the tower's cost follows the texts' real length.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax.models.layers import TOKEN_AXES, Blocks, TowerSettings, constrain, layer_norm, logical
from cloc_jax.models.spec import TextSpec

Packing = tuple[jax.Array, jax.Array, jax.Array]


def pack_texts(tokens: jax.Array, pack_length: int) -> tuple[jax.Array, Packing]:
    """[B, M, L'] zero-padded texts -> (tokens [B, P], (segments [B, P], positions [B, P], ends [B, M])).

    Row b holds its M texts end to end: a token of text m has segment m and its position inside that
    text; the padding after the last text has segment M. ends[b, m] is the index of text m's last
    token (-1 for an empty text, which pools to zeros). The caller keeps each row's total length <= P
    (the data pipeline drops the regions that would not fit); tokens past P are cut off.
    """
    batch, m, length = tokens.shape
    lengths = jnp.max(jnp.where(tokens != 0, jnp.arange(1, length + 1), 0), axis=-1)  # through the last non-pad
    stops = jnp.cumsum(lengths, axis=-1)
    starts = stops - lengths
    index = jnp.arange(pack_length)
    segments = (stops[:, None, :] <= index[None, :, None]).sum(-1)  # texts that ended before each slot
    text = jnp.minimum(segments, m - 1)
    positions = jnp.where(segments < m, index - jnp.take_along_axis(starts, text, axis=-1), 0)
    flat = jnp.take_along_axis(tokens.reshape(batch, m * length), text * length + positions, axis=-1)
    packed = jnp.where(segments < m, flat, 0)
    return packed, (segments, positions, jnp.where(lengths > 0, stops - 1, -1))


TEXT_POOLS = ("eot", "last")


class TextTower(nn.Module):
    """Tokens [B, L <= context_length] (0 = padding, ending in EOT) -> (embedding [B, out_dim], features [B, L, D]).

    CLIP's tower (the default) is causal and pools at the EOT token (the last non-padding one): it sees the
    whole text and never the padding after it. SigLIP's is bidirectional (`causal=False`) and pools at the
    last position (`pool="last"`), so its padding is part of the input. With
    `packing` (from `pack_texts`), tokens [B, P] hold several texts per row: each attends only to its
    own segment, takes position embeddings from its own start, and the embedding is [B, M, out_dim].
    """

    spec: TextSpec  # the architecture, with vocab_size resolved (build.py)
    tower: TowerSettings
    context_length: int  # the tokenizer's

    @nn.compact
    def __call__(self, tokens: jax.Array, packing: Packing | None = None) -> tuple[jax.Array, jax.Array]:
        if self.spec.pool not in TEXT_POOLS:
            raise ValueError(f"model.text.pool={self.spec.pool!r}; choose one of {TEXT_POOLS}")
        if packing is not None and (self.spec.pool != "eot" or not self.spec.causal):
            raise ValueError("region_pack_length > 0 needs a causal text tower pooled at EOT (CLIP's), not SigLIP's")
        length = tokens.shape[-1]
        if packing is None and length > self.context_length:
            raise ValueError(f"tokens have length {length}, the text tower takes at most {self.context_length}")
        x = nn.Embed(
            self.spec.vocab_size,
            self.spec.width,
            dtype=self.tower.dtype,
            embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embed",
        )(tokens)
        posemb = self.param(
            "pos_embedding",
            logical(nn.initializers.normal(0.01), (None, "embed")),
            (self.context_length, self.spec.width),
        )
        if packing is None:
            eot = length - 1 - jnp.argmax((tokens != 0)[:, ::-1], axis=-1)  # last non-pad token [B]
            eot = eot if self.spec.pool == "eot" else jnp.full_like(eot, length - 1)
            posemb, segment_ids = posemb[:length], None
        else:
            segments, positions, eot = packing
            posemb = posemb[positions]
            segment_ids = (segments, segments)  # a token sees its own text only (kernels take ids, not a bias)
        x = constrain(x + posemb.astype(self.tower.dtype), TOKEN_AXES)
        x = Blocks(
            self.spec.depth,
            self.spec.heads,
            self.spec.mlp_dim,
            causal=self.spec.causal,
            scan=self.tower.scan,
            remat=self.tower.remat,
            activation=self.tower.activation,
            ln_eps=self.tower.ln_eps,
            dtype=self.tower.dtype,
            attention=self.tower.attention,
            name="encoder",
        )(x, segment_ids=segment_ids)
        x = layer_norm("ln_final", self.tower.dtype, self.tower.ln_eps)(x)
        pooled = jnp.einsum("bld,b...l->b...d", x, jax.nn.one_hot(eot, length, dtype=x.dtype))
        embedding = nn.Dense(
            self.tower.out_dim,
            use_bias=self.spec.proj_bias,
            dtype=self.tower.dtype,
            kernel_init=logical(nn.initializers.normal(self.spec.width**-0.5), ("embed", "joint")),
            bias_init=logical(nn.initializers.zeros, ("joint",)),
            name="proj",
        )(pooled)
        return embedding, x
