"""The two-tower model: ViT image tower + CLIP text tower + a learnable temperature (and SigLIP bias).

Region heads (Prompter / RoIAlign) attach here and read the image token grid returned by the ViT.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cloc_jax.models.layers import logical
from cloc_jax.models.text import TextTower
from cloc_jax.models.vit import ViT, vit_size

LOSSES = ("softmax", "sigmoid")
# (initial logit scale, initial bias): CLIP starts at 1/0.07 and has no bias; SigLIP at 10 and -10.
LOSS_INITS = {"softmax": (1 / 0.07, None), "sigmoid": (10.0, -10.0)}
MAX_LOGIT_SCALE = 100.0


def normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


class Model(nn.Module):
    image: ViT
    text: TextTower
    loss: str = "softmax"

    def setup(self):
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss={self.loss!r}; choose one of {LOSSES}")
        scale, bias = LOSS_INITS[self.loss]
        self.log_scale = self.param("log_scale", logical(nn.initializers.constant(jnp.log(scale)), ()), ())
        self.bias = None if bias is None else self.param("bias", logical(nn.initializers.constant(bias), ()), ())

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, H, W, 3] in [-1, 1] -> (unit embedding [B, E], token grid [B, h, w, D])."""
        embedding, grid = self.image(images)
        return normalize(embedding.astype(jnp.float32)), grid

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int32 -> unit embedding [B, E]."""
        embedding, _ = self.text(tokens)
        return normalize(embedding.astype(jnp.float32))

    def logit_params(self) -> tuple[jax.Array, jax.Array | None]:
        scale = jnp.minimum(jnp.exp(self.log_scale), MAX_LOGIT_SCALE)
        return scale, self.bias

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        zimg, grid = self.encode_image(images)
        scale, bias = self.logit_params()
        out = dict(zimg=zimg, ztxt=self.encode_text(tokens), grid=grid, scale=scale)
        if bias is not None:
            out["bias"] = bias
        return out


def build_model(model: ml_collections.ConfigDict, image_size: int, vocab_size: int, context_length: int) -> Model:
    """The one place a config becomes a model."""
    dtype = jnp.dtype(model.dtype)
    patch = vit_size(model.image.variant).patch
    if image_size % patch:
        raise ValueError(f"image_size={image_size} is not divisible by the patch size {patch} of {model.image.variant}")
    common = dict(out_dim=model.embed_dim, scan=model.scan, remat=model.remat, dtype=dtype)
    image = ViT(
        variant=model.image.variant, pool=model.image.pool, posemb_grid=image_size // patch, **common, name="image"
    )
    text = TextTower(
        vocab_size=vocab_size,
        width=model.text.width,
        depth=model.text.depth,
        heads=model.text.heads,
        mlp_dim=model.text.mlp_dim,
        context_length=context_length,
        **common,
        name="text",
    )
    return Model(image=image, text=text, loss=model.loss)
