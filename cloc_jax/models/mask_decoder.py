"""The open-vocabulary mask decoder of dense adaptation (UMG-CLIP's downstream setting, FC-CLIP's decoder).

The ViT's last token grid [B, h, w, D] (stride p) becomes a simple feature pyramid (ViTDet: deconvolutions up to
4x, identity, max-pool down to 1/2 of the grid), each level projected to the decoder's width. A top-down pass
(FPN) sums the levels into per-pixel embeddings at 4x the grid (stride p / 4). Q learned queries run through
Mask2Former's decoder layers: masked cross-attention to one pyramid level per layer (coarse to fine, round robin;
each query sees only the pixels its previous mask covers, all of them when that mask is empty), self-attention,
MLP. After the query init and after every layer the shared heads predict
- masks: query mask embeddings x per-pixel embeddings -> logits [B, Q, 4h, 4w];
- classes: a unit embedding per query in the CLIP joint space [B, Q, E], scored by cosine against class-name text
  embeddings and a learned void embedding (`class_logits`), so any vocabulary can be asked at inference.
Positional encodings (2D sine, DETR's) are added to the pixels entering the attention as keys and values, and the
learned query positions to the queries; layers are post-norm as in Mask2Former.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cloc_jax.models.cloc import Model
from cloc_jax.models.heads import normalize
from cloc_jax.models.layers import Attention, Dtype, Mlp, constrain, layer_norm, logical

LEVEL_SCALES = (0.5, 1.0, 2.0)  # cross-attention levels relative to the token grid (Mask2Former's 1/32, 1/16, 1/8)
PIXEL_SCALE = 4  # per-pixel embeddings at 4x the token grid (1/4 of the input at patch 16)
GRID_AXES = ("activation_batch", None, None, "activation_embed")


def sine_positions(h: int, w: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """DETR's 2D sine encoding of an h x w grid -> [h * w, dim]: half the channels for y, half for x."""
    quarter = dim // 4
    freq = temperature ** (np.arange(quarter) / quarter)
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h * 2 * np.pi, (np.arange(w) + 0.5) / w * 2 * np.pi, indexing="ij")
    parts = [f(c.reshape(-1, 1) / freq) for c in (ys, xs) for f in (np.sin, np.cos)]
    out = np.concatenate(parts, -1)
    return np.pad(out, ((0, 0), (0, dim - out.shape[1]))).astype(np.float32)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, transpose: bool = False) -> nn.Module:
    kind = nn.ConvTranspose if transpose else nn.Conv
    return kind(
        features,
        (kernel, kernel),
        strides=(kernel, kernel) if transpose else (1, 1),
        padding="VALID" if transpose else "SAME",
        dtype=dtype,
        kernel_init=logical(nn.initializers.xavier_uniform(), (None, None, "embed", "mlp")),
        bias_init=logical(nn.initializers.zeros, ("mlp",)),
        name=name,
    )


class SimpleFeaturePyramid(nn.Module):
    """grid [B, h, w, D] -> ({scale: [B, h s, w s, dim]} for s in LEVEL_SCALES and PIXEL_SCALE, pixel embeddings
    [B, 4h, 4w, dim]): ViTDet's levels, then FPN's top-down sum into the finest."""

    dim: int
    dtype: Dtype = jnp.float32

    def _level(self, x: jax.Array, scale: float) -> jax.Array:
        width, name = x.shape[-1], f"level_{scale:g}".replace(".", "_")
        if scale == 4:
            x = _conv(width // 2, 2, self.dtype, f"{name}_up1", transpose=True)(x)
            x = nn.gelu(layer_norm(f"{name}_norm_up", self.dtype)(x))
            x = _conv(width // 4, 2, self.dtype, f"{name}_up2", transpose=True)(x)
        elif scale == 2:
            x = _conv(width // 2, 2, self.dtype, f"{name}_up1", transpose=True)(x)
        elif scale == 0.5:
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = layer_norm(f"{name}_norm1", self.dtype)(_conv(self.dim, 1, self.dtype, f"{name}_proj")(x))
        return layer_norm(f"{name}_norm2", self.dtype)(_conv(self.dim, 3, self.dtype, f"{name}_conv")(x))

    @nn.compact
    def __call__(self, grid: jax.Array) -> tuple[dict, jax.Array]:
        if grid.shape[1] % 2 or grid.shape[2] % 2:
            raise ValueError(f"the mask decoder's pyramid halves the token grid: {grid.shape[1:3]} is odd")
        levels = {s: constrain(self._level(grid, s), GRID_AXES) for s in (*LEVEL_SCALES, PIXEL_SCALE)}
        top = levels[LEVEL_SCALES[0]]
        for scale in (*LEVEL_SCALES[1:], PIXEL_SCALE):  # top-down: upsample the coarser sum, add the level
            b, h, w, c = levels[scale].shape
            top = jax.image.resize(top, (b, h, w, c), "bilinear") + levels[scale]
        pixels = _conv(self.dim, 3, self.dtype, "pixel_out")(nn.gelu(top))
        return levels, constrain(pixels, GRID_AXES)


class DecoderLayer(nn.Module):
    """queries [B, Q, C] -> [B, Q, C]: masked cross-attention to `memory` [B, S, C], self-attention, MLP."""

    heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, query_pos, memory, memory_pos, attention_bias) -> jax.Array:
        cross = Attention(self.heads, dtype=self.dtype, name="cross_attention")
        queries = layer_norm("norm_cross", self.dtype)(
            queries + cross(queries + query_pos, memory + memory_pos, bias=attention_bias)
        )
        with_pos = queries + query_pos
        queries = layer_norm("norm_self", self.dtype)(
            queries + Attention(self.heads, dtype=self.dtype, name="self_attention")(with_pos, with_pos)
        )
        return layer_norm("norm_mlp", self.dtype)(queries + Mlp(self.mlp_dim, self.dtype, "gelu", name="mlp")(queries))


class MaskDecoder(nn.Module):
    """grid [B, h, w, D] -> {"masks": [L + 1, B, Q, 4h, 4w] logits, "classes": [L + 1, B, Q, E] unit embeddings}
    (the prediction after the query init and after each of the L layers; the last is the answer), plus the learned
    "void" [E] unit embedding and "scale" (the class logits' learned inverse temperature)."""

    num_queries: int
    dim: int
    layers: int
    heads: int
    mlp_dim: int
    embed_dim: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.pyramid = SimpleFeaturePyramid(self.dim, self.dtype)
        self.query_features = self.param(
            "query_features", logical(nn.initializers.normal(1.0), (None, "embed")), (self.num_queries, self.dim)
        )
        self.query_positions = self.param(
            "query_positions", logical(nn.initializers.normal(1.0), (None, "embed")), (self.num_queries, self.dim)
        )
        self.level_embed = self.param(
            "level_embed", logical(nn.initializers.normal(1.0), (None, "embed")), (len(LEVEL_SCALES), self.dim)
        )
        self.decoder = [
            DecoderLayer(self.heads, self.mlp_dim, self.dtype, name=f"layer_{i}") for i in range(self.layers)
        ]
        self.out_norm = layer_norm("out_norm", self.dtype)
        self.class_proj = nn.Dense(
            self.embed_dim, dtype=self.dtype, kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "joint"))
        )
        kernel = logical(nn.initializers.xavier_uniform(), ("embed", "mlp"))
        self.mask_mlp = [nn.Dense(self.dim, dtype=self.dtype, kernel_init=kernel) for _ in range(3)]
        self.void = self.param("void", logical(nn.initializers.normal(1.0), ("joint",)), (self.embed_dim,))
        self.log_scale = self.param("log_scale", logical(nn.initializers.constant(np.log(1 / 0.07)), ()), ())

    def _predict(self, queries: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """queries [B, Q, C], pixels [B, H, W, C] -> (mask logits [B, Q, H, W], class embeddings [B, Q, E])."""
        x = self.out_norm(queries)
        embed = x
        for i, dense in enumerate(self.mask_mlp):
            embed = dense(embed) if i == len(self.mask_mlp) - 1 else nn.relu(dense(embed))
        masks = jnp.einsum("bqc,bhwc->bqhw", embed, pixels)
        return masks.astype(jnp.float32), normalize(self.class_proj(x).astype(jnp.float32))

    def __call__(self, grid: jax.Array) -> dict:
        levels, pixels = self.pyramid(grid)
        batch = grid.shape[0]
        queries = jnp.broadcast_to(self.query_features.astype(self.dtype), (batch, self.num_queries, self.dim))
        query_pos = self.query_positions.astype(self.dtype)[None]
        masks, classes = self._predict(queries, pixels)
        all_masks, all_classes = [masks], [classes]
        for i, layer in enumerate(self.decoder):
            level = i % len(LEVEL_SCALES)
            memory = levels[LEVEL_SCALES[level]]
            _, h, w, _ = memory.shape
            pos = jnp.asarray(sine_positions(h, w, self.dim), self.dtype)[None] + self.level_embed[level].astype(
                self.dtype
            )
            # Masked attention: only where the previous mask (resized to this level) is above 0.5; an empty mask
            # attends everywhere. Masks are a prediction, not a path for gradients.
            small = jax.image.resize(jax.lax.stop_gradient(masks), (*masks.shape[:2], h, w), "bilinear")
            blocked = small.reshape(batch, self.num_queries, h * w) < 0
            blocked = blocked & ~blocked.all(-1, keepdims=True)
            bias = jnp.where(blocked, -1e9, 0.0).astype(jnp.float32)[:, None]  # [B, 1, Q, S]
            queries = layer(queries, query_pos, memory.reshape(batch, h * w, self.dim), pos, bias)
            masks, classes = self._predict(queries, pixels)
            all_masks.append(masks)
            all_classes.append(classes)
        return dict(
            masks=jnp.stack(all_masks),
            classes=jnp.stack(all_classes),
            void=normalize(self.void.astype(jnp.float32)),
            scale=jnp.exp(self.log_scale),
        )


def class_logits(classes: jax.Array, void: jax.Array, scale: jax.Array, text: jax.Array) -> jax.Array:
    """Query embeddings [..., Q, E], void [E], scale, class-name embeddings [C, E] (unit) -> logits [..., Q, C + 1]
    (void last): cosine times the learned scale."""
    return scale * jnp.einsum("...qe,ce->...qc", classes, jnp.concatenate([text, void[None]], 0))


def make_decoder(d, model: Model) -> MaskDecoder:
    """The decoder `d` (config.dense) describes, over `model`'s image tower."""
    dtype = model.image.tower.dtype
    return MaskDecoder(d.num_queries, d.dim, d.layers, d.heads, d.mlp_dim, model.spec.embed_dim, dtype)


def backbone_grid(model: Model, params: dict, images: jax.Array) -> jax.Array:
    """images [B, S, S, 3] -> the ViT's token grid [B, h, w, D]; a constant unless the backbone has adapters."""
    grid = model.apply({"params": params}, images, method=lambda m, x: m.image(x, None)[1])
    return grid if model.image.spec.adapter_dim else jax.lax.stop_gradient(grid)


def frozen_backbone(params: dict) -> dict:
    """The backbone as pretrained: adapters' up-projections zeroed (they start at zero, so this is the model before
    adaptation), for FC-CLIP's out-of-vocabulary scores."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return flax.traverse_util.unflatten_dict(
        {k: jnp.zeros_like(v) if "adapter" in k and "/up/" in k else v for k, v in flat.items()}, sep="/"
    )
