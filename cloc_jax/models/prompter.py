"""CLOC Prompter: image token grid + a prompt (a box, or a text) -> a region embedding; box head for grounding.

A box becomes two tokens, the sinusoidal encodings of its top-left and bottom-right corners. The
prompt tokens and the image tokens form the sequence of a single-layer, single-head transformer
encoder at the ViT width; the prompt tokens' outputs are average-pooled and projected into the joint
space. In one layer a prompt token's output depends only on the layer's *inputs*, so computing just
the prompt rows is exact, and the image tokens' keys/values are computed once per image and shared by
all M prompts (and by the text prompts of grounding, in the same step): the Prompter costs O(M x N)
instead of M extra transformer layers over N tokens.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax.boxes import cell_coverage, cxcywh_to_xyxy
from cloc_jax.models.layers import Dtype, Mlp, constrain, layer_norm, logical

# Prompts [B, M, P, D] stay split over the batch like the image tokens they read: without the hint XLA's
# partitioner follows the FSDP-sharded weights, replicates the batch and all-reduces [B, M, P, 4D] activations
# (2 GiB per device per step for L/14 at batch 32,768 on 1,024 chips).
PROMPT_AXES = ("activation_batch", None, None, "activation_embed")


def sincos(points: jax.Array, dim: int, temperature: float = 10_000.0) -> jax.Array:
    """[..., 2] (x, y) in [0, 1] -> [..., dim] sinusoidal encoding (DETR-style, dim/4 frequencies per axis)."""
    if dim % 4:
        raise ValueError(f"sinusoidal encoding needs a width divisible by 4, got {dim}")
    freqs = temperature ** (-jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4))
    angles = 2 * jnp.pi * points[..., :, None].astype(jnp.float32) * freqs  # [..., 2, dim/4]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*points.shape[:-1], dim)


def grid_centres(h: int, w: int) -> jax.Array:
    """[h*w, 2] (x, y) centres of the token cells, in [0, 1]."""
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij")
    return jnp.stack([xs.ravel(), ys.ravel()], axis=-1)


def _dense(features: int, names: tuple[str, str], dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=logical(nn.initializers.xavier_uniform(), names),
        bias_init=logical(nn.initializers.zeros, (names[1],)),
        name=name,
    )


class Prompter(nn.Module):
    """Shared by box and text prompts: `box_prompts`/`text_prompts` -> `pool` -> `embed` / `box_head`."""

    width: int  # the ViT width D
    out_dim: int
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32

    def setup(self):
        d, dt = self.width, self.dtype
        self.corner_proj = _dense(d, ("kv", "embed"), dt, "corner_proj")
        self.corner_type = self.param("corner_type", logical(nn.initializers.normal(0.02), (None, "embed")), (2, d))
        self.text_proj = _dense(d, ("joint", "embed"), dt, "text_proj")
        self.key_pos = _dense(d, ("kv", "embed"), dt, "key_pos")
        self.ln_kv, self.ln_q, self.ln_mlp, self.ln_out = (
            layer_norm(n, dt) for n in ("ln_kv", "ln_q", "ln_mlp", "ln_out")
        )
        self.query, self.key, self.value = (_dense(d, ("embed", "kv"), dt, n) for n in ("query", "key", "value"))
        self.out = _dense(d, ("kv", "embed"), dt, "out")
        self.mlp = Mlp(d * self.mlp_ratio, dt)
        self.proj = _dense(self.out_dim, ("embed", "joint"), dt, "proj", use_bias=False)
        self.head_hidden = _dense(d, ("embed", "mlp"), dt, "head_hidden")
        self.head_out = nn.Dense(
            4,
            dtype=dt,
            kernel_init=logical(nn.initializers.zeros, ("mlp", None)),
            bias_init=logical(nn.initializers.zeros, (None,)),
            name="head_out",
        )

    def box_prompts(self, boxes: jax.Array) -> jax.Array:
        """[B, M, 4] xyxy in [0, 1] -> [B, M, 2, D]: one token per corner."""
        corners = sincos(boxes.reshape(*boxes.shape[:-1], 2, 2), self.width)
        return constrain(
            self.corner_proj(corners.astype(self.dtype)) + self.corner_type.astype(self.dtype), PROMPT_AXES
        )

    def text_prompts(self, text_embeddings: jax.Array) -> jax.Array:
        """[B, M, E] text-tower embeddings -> [B, M, 1, D]."""
        return constrain(self.text_proj(text_embeddings.astype(self.dtype))[:, :, None], PROMPT_AXES)

    def memory(self, grid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """grid [B, h, w, D] -> the image tokens' keys and values [B, h*w, D], computed once per image and
        read by every prompt of it, box or text."""
        batch, h, w, width = grid.shape
        kv_in = grid.reshape(batch, h * w, width).astype(self.dtype)
        kv_in = self.ln_kv(kv_in + self.key_pos(sincos(grid_centres(h, w), width).astype(self.dtype)))
        return self.key(kv_in), self.value(kv_in)

    def pool(
        self,
        memory: tuple[jax.Array, jax.Array],
        prompts: jax.Array,
        grid_shape: tuple[int, int],
        boxes: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """memory (keys, values [B, N, D]), prompts [B, M, P, D] on an (h, w) grid -> (pooled outputs
        [B, M, D], attention on the grid [B, M, N]).

        With `boxes` [B, M, 4], attention to the image is biased by log(share of the box in each token
        cell): a box prompt starts out reading its box and learns how to weigh what is inside.
        """
        k_img, v_img = memory
        n, width = k_img.shape[1], self.width
        q_in = self.ln_q(prompts.astype(self.dtype))
        q = self.query(q_in)  # [B, M, P, D]
        k_prm, v_prm = self.key(q_in), self.value(q_in)  # [B, M, P, D]: a prompt's tokens see each other
        image_logits = jnp.einsum("bmpd,bnd->bmpn", q, k_img).astype(jnp.float32) * width**-0.5
        if boxes is not None:
            image_logits = image_logits + jnp.log(cell_coverage(boxes, *grid_shape) + 1e-6)[:, :, None]
        prompt_logits = jnp.einsum("bmpd,bmqd->bmpq", q, k_prm).astype(jnp.float32) * width**-0.5
        attn = jax.nn.softmax(jnp.concatenate([image_logits, prompt_logits], axis=-1), axis=-1).astype(self.dtype)
        mixed = jnp.einsum("bmpn,bnd->bmpd", attn[..., :n], v_img)
        mixed = mixed + jnp.einsum("bmpq,bmqd->bmpd", attn[..., n:], v_prm)
        x = constrain(prompts.astype(self.dtype) + self.out(mixed), PROMPT_AXES)
        x = constrain(x + self.mlp(self.ln_mlp(x)), PROMPT_AXES)
        return self.ln_out(x.mean(axis=2)), attn[..., :n].astype(jnp.float32).mean(axis=2)

    def embed(self, pooled: jax.Array) -> jax.Array:
        """[B, M, D] -> region embeddings [B, M, out_dim] in the joint space (not normalised)."""
        return self.proj(pooled)

    def box_head(self, pooled: jax.Array, attention: jax.Array, grid_shape: tuple[int, int]) -> jax.Array:
        """pooled [B, M, D], attention [B, M, N] -> boxes [B, M, 4] xyxy in [0, 1].

        Anchored on the grid (as OWL-ViT biases its boxes by token positions): the starting box is the
        attention-weighted centre of the token cells and a size from their spread (a uniform interval of
        length s has variance s^2 / 12); the MLP, initialised to zero, learns the correction.
        """
        centres = grid_centres(*grid_shape)  # [N, 2]
        mean = attention @ centres
        spread = jnp.sqrt(12 * jnp.clip(attention @ centres**2 - mean**2, 1e-6, None))
        delta = self.head_out(nn.gelu(self.head_hidden(pooled))).astype(jnp.float32)
        cxcywh = jnp.concatenate([mean + delta[..., :2], spread * jnp.exp(delta[..., 2:])], axis=-1)
        return jnp.clip(cxcywh_to_xyxy(cxcywh), 0.0, 1.0)

    def __call__(self, grid: jax.Array, boxes: jax.Array, text_embeddings: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Initialises every parameter: (region embeddings [B, M, E], grounded boxes [B, M, 4])."""
        memory, shape = self.memory(grid), grid.shape[1:3]
        regions = self.embed(self.pool(memory, self.box_prompts(boxes), shape, boxes)[0])
        pooled, attention = self.pool(memory, self.text_prompts(text_embeddings), shape)
        return regions, self.box_head(pooled, attention, shape)
