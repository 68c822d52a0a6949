"""The two-tower model: ViT image tower + CLIP text tower + a learnable temperature (and SigLIP bias).

Region heads (Prompter / RoIAlign) attach here and read the image token grid returned by the ViT.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cloc_jax.models.layers import logical
from cloc_jax.models.prompter import Prompter
from cloc_jax.models.text import TextTower, pack_texts
from cloc_jax.models.vit import ViT, vit_size

LOSSES = ("softmax", "sigmoid")
# (initial logit scale, initial bias): CLIP starts at 1/0.07 and has no bias; SigLIP at 10 and -10.
LOSS_INITS = {"softmax": (1 / 0.07, None), "sigmoid": (10.0, -10.0)}
MAX_LOGIT_SCALE = 100.0


def normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


REGION_EXTRACTORS = ("none", "prompter", "roi_align")


class Model(nn.Module):
    image: ViT
    text: TextTower
    loss: str = "softmax"
    region_extractor: str = "none"
    prompter: Prompter | None = None  # with region_extractor="prompter"
    region_pack_length: int = 0  # > 0: training packs each image's region texts into one row this long
    max_logit_scale: float = MAX_LOGIT_SCALE  # 0: unclamped (imported checkpoints keep their learned value)

    def clamp_logit_scale(self, params: dict) -> dict:
        """Parameters with the temperature clamped at `max_logit_scale`, applied after each optimizer step
        (as open_clip does): a clamp in the forward pass would zero the gradient past the limit, and momentum
        would then push the parameter up where it could never come back. SigLIP's bias stays free."""
        if not self.max_logit_scale:
            return params
        return {**params, "log_scale": jnp.minimum(params["log_scale"], jnp.log(self.max_logit_scale))}

    def setup(self):
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss={self.loss!r}; choose one of {LOSSES}")
        scale, bias = LOSS_INITS[self.loss]
        self.log_scale = self.param("log_scale", logical(nn.initializers.constant(jnp.log(scale)), ()), ())
        self.bias = None if bias is None else self.param("bias", logical(nn.initializers.constant(bias), ()), ())

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, H, W, 3] in [-1, 1] -> (unit embedding [B, E], token grid [B, h, w, D])."""
        embedding, grid, _ = self.image(images)
        return normalize(embedding.astype(jnp.float32)), grid

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

    def encode_regions(self, grid: jax.Array, boxes: jax.Array) -> jax.Array:
        """Token grid [B, h, w, D] + boxes [B, M, 4] (xyxy, [0, 1]) -> unit region embeddings [B, M, E]."""
        return self._regions(self.prompter.memory(grid), grid.shape[1:3], boxes)

    def pool_regions(self, images: jax.Array, boxes: jax.Array) -> jax.Array:
        """CLIP-only regions: the image's own head inside each box (`ViT`'s "coverage") -> [B, M, E] unit vectors."""
        return normalize(self.image(images, boxes)[2].astype(jnp.float32))

    def ground(self, grid: jax.Array, text_embeddings: jax.Array) -> jax.Array:
        """Token grid [B, h, w, D] + text embeddings [B, M, E] -> boxes [B, M, 4] (xyxy, [0, 1])."""
        return self._ground(self.prompter.memory(grid), grid.shape[1:3], text_embeddings)

    def _regions(self, memory: tuple[jax.Array, jax.Array], grid_shape: tuple[int, int], boxes: jax.Array) -> jax.Array:
        """Prompter memory (`Prompter.memory`) + boxes [B, M, 4] -> unit region embeddings [B, M, E]."""
        pooled, _ = self.prompter.pool(memory, self.prompter.box_prompts(boxes), grid_shape, boxes)
        return normalize(self.prompter.embed(pooled).astype(jnp.float32))

    def _ground(
        self, memory: tuple[jax.Array, jax.Array], grid_shape: tuple[int, int], text_embeddings: jax.Array
    ) -> jax.Array:
        """Prompter memory + text embeddings [B, M, E] -> boxes [B, M, 4] (xyxy, [0, 1])."""
        pooled, attention = self.prompter.pool(memory, self.prompter.text_prompts(text_embeddings), grid_shape)
        return self.prompter.box_head(pooled, attention, grid_shape)

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
        """One image forward serves the image embedding and every region prompt.

        images [B, H, W, 3], tokens [B, L]; with a prompter also boxes [B, M, 4] and region_tokens
        [B, M, L'], the texts of the regions. Each region text is both the region's contrastive
        partner and the prompt the grounding head must turn back into the region's box. With
        tag_tokens [T, L'] (a tag vocabulary) the text tower also embeds the tags -> ztag [T, E].
        """
        if self.region_extractor != "none":
            boxes = jnp.where(jnp.isfinite(boxes), boxes, 0.0)  # padding or bad input must not make NaNs
        if self.region_extractor == "roi_align":  # RoIAlign regions come out of the same image forward
            embedding, grid, regions = self.image(images, boxes)
            zimg = normalize(embedding.astype(jnp.float32))
        else:
            zimg, grid = self.encode_image(images)
        scale, bias = self.logit_params()
        out = dict(zimg=zimg, ztxt=self.encode_text(tokens), grid=grid, scale=scale)
        if bias is not None:
            out["bias"] = bias
        if tag_tokens is not None:
            out["ztag"] = self.encode_text(tag_tokens)
        if self.region_extractor != "none":
            encode = self.encode_packed_texts if self.region_pack_length else self.encode_texts
            out["zregion_text"] = encode(region_tokens)
        if self.region_extractor == "roi_align":
            out["zregion"] = normalize(regions.astype(jnp.float32))
        elif self.prompter is not None:
            memory = self.prompter.memory(grid)  # the image keys/values, shared by box and text prompts
            out["zregion"] = self._regions(memory, grid.shape[1:3], boxes)
            out["pred_boxes"] = self._ground(memory, grid.shape[1:3], out["zregion_text"])
        return out


def build_model(
    model: ml_collections.ConfigDict,
    image_size: int,
    vocab_size: int,
    context_length: int,
    region_pack_length: int = 0,
) -> Model:
    """The one place a config becomes a model."""
    dtype = jnp.dtype(model.dtype)
    im = model.image
    size = vit_size(im.variant, im.width, im.depth, im.heads, im.mlp_dim)
    if image_size % size.patch:
        raise ValueError(f"image_size={image_size} is not divisible by the patch size {size.patch} of {im.variant}")
    if model.region_extractor not in REGION_EXTRACTORS:
        raise ValueError(f"model.region_extractor={model.region_extractor!r}; choose one of {REGION_EXTRACTORS}")
    common = dict(out_dim=model.embed_dim, scan=model.scan, remat=model.remat, dtype=dtype)
    common.update(activation=model.activation, ln_eps=model.ln_eps, attention=model.attention)
    image = ViT(
        variant=im.variant,
        pool=im.pool,
        posemb_grid=im.posemb_grid or image_size // size.patch,
        region_pool="roi_align" if model.region_extractor == "roi_align" else "coverage",
        cluster_ratio=im.cluster_ratio,
        cluster_layer=im.cluster_layer,
        cluster_unfold=im.cluster_unfold,
        cluster_spatial=im.cluster_spatial,
        cluster_knn=im.cluster_knn,
        adapter_dim=im.adapter_dim,
        width=im.width,
        depth=im.depth,
        heads=im.heads,
        mlp_dim=im.mlp_dim,
        ln_pre=im.ln_pre,
        patch_bias=im.patch_bias,
        project=im.project,
        proj_bias=im.proj_bias,
        posemb_resize=im.posemb_resize,
        pixel_mean=tuple(im.pixel_mean),
        pixel_std=tuple(im.pixel_std),
        **common,
        name="image",
    )
    tx = model.text
    text = TextTower(
        vocab_size=tx.vocab_size or vocab_size,
        width=tx.width,
        depth=tx.depth,
        heads=tx.heads,
        mlp_dim=tx.mlp_dim,
        context_length=context_length,
        causal=tx.causal,
        pool=tx.pool,
        proj_bias=tx.proj_bias,
        **common,
        name="text",
    )
    prompter = None
    if model.region_extractor == "prompter":
        prompter = Prompter(width=size.width, out_dim=model.embed_dim, dtype=dtype)
    return Model(
        image=image,
        text=text,
        loss=model.loss,
        region_extractor=model.region_extractor,
        prompter=prompter,
        region_pack_length=region_pack_length,
        max_logit_scale=model.max_logit_scale,
    )
