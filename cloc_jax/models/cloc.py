"""The two-tower model: ViT image tower + CLIP text tower + a learnable temperature (and SigLIP bias).

Region heads (`models/heads.py`: Prompter, RoIAlign, box pooling) read the image token grid the ViT returns.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax.models.heads import RegionHead, normalize, region_head
from cloc_jax.models.layers import logical
from cloc_jax.models.spec import ModelSpec
from cloc_jax.models.text import TextTower, pack_texts
from cloc_jax.models.vit import ViT

LOSSES = ("softmax", "sigmoid")
# (initial logit scale, initial bias): CLIP starts at 1/0.07 and has no bias; SigLIP at 10 and -10.
LOSS_INITS = {"softmax": (1 / 0.07, None), "sigmoid": (10.0, -10.0)}
MAX_LOGIT_SCALE = 100.0


class Model(nn.Module):
    """Built by `models.build.build` from a spec; `spec` is the spec's model part, `head` its region head."""

    image: ViT
    text: TextTower
    spec: ModelSpec
    prompter: nn.Module | None = None  # the region head's own parameters (the Prompter), if it has any
    region_pack_length: int = 0  # > 0: training packs each image's region texts into one row this long

    @property
    def head(self) -> RegionHead:
        return region_head(self.spec.region_extractor)

    def clamp_logit_scale(self, params: dict) -> dict:
        """Parameters with the temperature clamped at `max_logit_scale`, applied after each optimizer step
        (as open_clip does): a clamp in the forward pass would zero the gradient past the limit, and momentum
        would then push the parameter up where it could never come back. SigLIP's bias stays free.
        0: unclamped (imported checkpoints keep their learned value)."""
        if not self.spec.max_logit_scale:
            return params
        return {**params, "log_scale": jnp.minimum(params["log_scale"], jnp.log(self.spec.max_logit_scale))}

    def setup(self):
        if self.spec.loss not in LOSSES:
            raise ValueError(f"model.loss={self.spec.loss!r}; choose one of {LOSSES}")
        scale, bias = LOSS_INITS[self.spec.loss]
        self.log_scale = self.param("log_scale", logical(nn.initializers.constant(jnp.log(scale)), ()), ())
        self.bias = None if bias is None else self.param("bias", logical(nn.initializers.constant(bias), ()), ())

    def encode_image(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] in [-1, 1] -> unit embedding [B, E]."""
        return self.head.image_forward(self, images, None)[0]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int32 -> unit embedding [B, E]."""
        embedding, _ = self.text(tokens)
        return normalize(embedding.astype(jnp.float32))

    def encode_texts(self, tokens: jax.Array) -> jax.Array:
        """[B, M, L] -> unit embeddings [B, M, E] (region captions, referring expressions)."""
        batch, m, length = tokens.shape
        return self.encode_text(tokens.reshape(batch * m, length)).reshape(batch, m, -1)

    def encode_packed_texts(self, tokens: jax.Array) -> jax.Array:
        """[B, M, L'] -> [B, M, E] as `encode_texts`, through one packed row per image (`pack_texts`)."""
        embedding, _ = self.text(*pack_texts(tokens, self.region_pack_length))
        return normalize(embedding.astype(jnp.float32))

    def encode_regions(self, images: jax.Array, boxes: jax.Array) -> jax.Array:
        """[B, H, W, 3] + boxes [B, M, 4] (xyxy, [0, 1]) -> unit region embeddings [B, M, E], by the region head."""
        return self.head.regions(self, images, boxes)

    def ground(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """[B, H, W, 3] + texts [B, M, L'] -> boxes [B, M, 4] (xyxy, [0, 1]); an error without a grounding head."""
        return self.head.ground(self, images, tokens)

    def dense(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> unit embeddings [B, h, w, E] of every token's cell of the h x w grid, by the region head."""
        return self.head.dense(self, images)

    def dense_windows(self, images: jax.Array, window: int) -> jax.Array:
        """[B, L, L, 3] -> [B, L/p, L/p, E]: `dense` of every `window` x `window` crop at a stride of half a window
        (the sliding-window protocol of training-free segmentation), averaged where they overlap and renormalised.
        L - window must be a multiple of the stride, and the stride of the patch size p."""
        size, patch, stride = images.shape[1], self.image.size().patch, window // 2
        if (size - window) % stride or stride % patch or images.shape[2] != size:
            raise ValueError(f"sliding windows of {window} px (stride {stride}) do not tile {images.shape[1:3]} inputs")
        starts = range(0, size - window + 1, stride)
        crops = jnp.stack([images[:, y : y + window, x : x + window] for y in starts for x in starts], 1)
        dense = self.dense(crops.reshape(-1, window, window, 3))
        dense = dense.reshape(images.shape[0], len(starts) ** 2, *dense.shape[1:])
        g, h = size // patch, window // patch
        total, count = jnp.zeros((images.shape[0], g, g, dense.shape[-1])), jnp.zeros((g, g, 1))
        for k, (y, x) in enumerate((y, x) for y in starts for x in starts):
            total = total.at[:, y // patch : y // patch + h, x // patch : x // patch + h].add(dense[:, k])
            count = count.at[y // patch : y // patch + h, x // patch : x // patch + h].add(1.0)
        return normalize(total / count)

    def evaluate(self, images: jax.Array, boxes: jax.Array, ground_tokens: jax.Array, needs: frozenset) -> dict:
        """What an evaluation pass needs ("image", "regions", "ground", "dense") from one image forward."""
        return self.head.evaluate(self, images, boxes, ground_tokens, needs)

    def logit_params(self) -> tuple[jax.Array, jax.Array | None]:
        return jnp.exp(self.log_scale), self.bias

    def __call__(
        self,
        images: jax.Array,
        tokens: jax.Array,
        boxes: jax.Array | None = None,
        region_tokens: jax.Array | None = None,
        tag_tokens: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """The training forward: one image forward serves the image embedding and every region prompt.

        images [B, H, W, 3], tokens [B, L]; with a head that trains regions also boxes [B, M, 4] and
        region_tokens [B, M, L'], the texts of the regions (`head.batch_fields`). Each region text is both the
        region's contrastive partner and, for a grounding head, the prompt it must turn back into the
        region's box. With tag_tokens [T, L'] (a tag vocabulary) the text tower also embeds the tags -> ztag.
        """
        head = self.head
        if head.trains:
            boxes = jnp.where(jnp.isfinite(boxes), boxes, 0.0)  # padding or bad input must not make NaNs
        zimg, grid, regions = head.image_forward(self, images, boxes if head.trains else None)
        scale, bias = self.logit_params()
        out = dict(zimg=zimg, ztxt=self.encode_text(tokens), grid=grid, scale=scale)
        if bias is not None:
            out["bias"] = bias
        if tag_tokens is not None:
            out["ztag"] = self.encode_text(tag_tokens)
        if head.trains:
            encode = self.encode_packed_texts if self.region_pack_length else self.encode_texts
            out["zregion_text"] = encode(region_tokens)
            out.update(head.train_outputs(self, grid, boxes, regions, out["zregion_text"]))
        return out
