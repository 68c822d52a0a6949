"""Region heads behind one interface: how a model turns boxes into region embeddings, and texts into boxes.

A model's head is chosen by `spec.model.region_extractor`, a key of `HEADS`; training, inference, evaluation
and export ask the head (`trains`, `can_ground`, `batch_fields`, ...), never the string. Each method takes the
bound `Model` (`models/cloc.py`) and shares one image forward between the image embedding and every box.
Dense outputs are the head's region embeddings of every token's own cell (`dense`), so each head reads pixels
the way it reads boxes, and an imported CLIP gets its head's box pooling per patch (its final norm and projection
of the token; a MAP head attending to the token alone):
- "prompter" (CLOC): the Prompter reads the ViT's token grid; box prompts give regions, text prompts boxes.
- "roi_align" (UMG-CLIP): RoIAlign on the token grid inside the ViT, then its final norm and projection.
- "none" (CLIP-only): no region training; at inference the image's own head pools inside each box.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax.boxes import cell_boxes
from cloc_jax.models.layers import Dtype
from cloc_jax.models.prompter import Prompter


def normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


@dataclasses.dataclass(frozen=True)
class RegionHead:
    name: str
    description: str  # for messages: "box pooling through the image head"
    image_pool: str  # how the ViT pools boxes itself (`ViT.region_pool`): "coverage" or "roi_align"
    trains: bool  # training batches carry boxes and region texts for it (region losses apply)
    can_ground: bool  # it turns texts into boxes (a grounding head)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """What the model reads from a training batch besides the image and its caption tokens."""
        return ("boxes", "region_tokens") if self.trains else ()

    def module(self, width: int, out_dim: int, dtype: Dtype) -> nn.Module | None:
        """The head's own parameters, a submodule of the model (named "prompter"), or None."""
        return None

    def image_forward(self, model, images: jax.Array, boxes: jax.Array | None):
        """-> (unit image embedding [B, E], token grid [B, h, w, D], raw regions [B, M, E] or None): one ViT pass."""
        embedding, grid, regions = model.image(images, boxes)
        return normalize(embedding.astype(jnp.float32)), grid, regions

    def train_outputs(self, model, grid, boxes, regions, region_text_embeddings) -> dict:
        """After the texts: {"zregion": [B, M, E] unit, and "pred_boxes" [B, M, 4] for a grounding head}."""
        return dict(zregion=normalize(regions.astype(jnp.float32)))

    def regions(self, model, images: jax.Array, boxes: jax.Array) -> jax.Array:
        """images [B, H, W, 3] + boxes [B, M, 4] (xyxy in [0, 1]) -> unit region embeddings [B, M, E]."""
        return normalize(model.image(images, boxes)[2].astype(jnp.float32))

    def ground(self, model, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """images [B, H, W, 3] + texts [B, M, L'] -> boxes [B, M, 4] (xyxy in [0, 1])."""
        raise ValueError(f"this model's region head ({self.description}) cannot ground texts: it has no box head")

    def dense(self, model, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> unit embeddings [B, h, w, E] of the h x w token grid's cells, in the joint space."""
        (h, w), cells = _cells(model, images)
        return self.regions(model, images, cells).reshape(images.shape[0], h, w, -1)

    def evaluate(self, model, images, boxes, ground_tokens, needs: frozenset) -> dict:
        """One image forward -> {"image": [B, E], "regions": [B, M, E], "ground": [B, M, 4], "dense": [B, h, w, E]}
        as `needs` asks (the boxes and the grid's cells pooled together)."""
        queries = [boxes] if "regions" in needs else []
        if "dense" in needs:
            (h, w), cells = _cells(model, images)
            queries.append(cells)
        zimg, _, regions = self.image_forward(model, images, jnp.concatenate(queries, 1) if queries else None)
        out = dict(image=zimg)
        if "regions" in needs:
            out["regions"] = normalize(regions[:, : boxes.shape[1]].astype(jnp.float32))
        if "dense" in needs:
            out["dense"] = normalize(regions[:, -h * w :].astype(jnp.float32)).reshape(images.shape[0], h, w, -1)
        return out


@dataclasses.dataclass(frozen=True)
class PrompterHead(RegionHead):
    """CLOC's Prompter: box and text prompts read the same image keys and values (`Prompter.memory`)."""

    def module(self, width: int, out_dim: int, dtype: Dtype) -> nn.Module:
        return Prompter(width=width, out_dim=out_dim, dtype=dtype, name="prompter")

    def image_forward(self, model, images: jax.Array, boxes: jax.Array | None):
        return super().image_forward(model, images, None)  # regions come from the grid, after the texts

    def train_outputs(self, model, grid, boxes, regions, region_text_embeddings) -> dict:
        memory = model.prompter.memory(grid)  # the image keys/values, shared by box and text prompts
        zregion = self._regions(model, memory, grid.shape[1:3], boxes)
        return dict(zregion=zregion, pred_boxes=self._ground(model, memory, grid.shape[1:3], region_text_embeddings))

    def regions(self, model, images: jax.Array, boxes: jax.Array) -> jax.Array:
        grid = self.image_forward(model, images, None)[1]
        return self._regions(model, model.prompter.memory(grid), grid.shape[1:3], boxes)

    def ground(self, model, images: jax.Array, tokens: jax.Array) -> jax.Array:
        grid = self.image_forward(model, images, None)[1]
        return self._ground(model, model.prompter.memory(grid), grid.shape[1:3], model.encode_texts(tokens))

    def evaluate(self, model, images, boxes, ground_tokens, needs: frozenset) -> dict:
        zimg, grid, _ = self.image_forward(model, images, None)
        out = dict(image=zimg)
        memory = model.prompter.memory(grid)
        if "regions" in needs:
            out["regions"] = self._regions(model, memory, grid.shape[1:3], boxes)
        if "ground" in needs:
            out["ground"] = self._ground(model, memory, grid.shape[1:3], model.encode_texts(ground_tokens))
        if "dense" in needs:
            (h, w), cells = _cells(model, images)
            out["dense"] = self._regions(model, memory, (h, w), cells).reshape(images.shape[0], h, w, -1)
        return out

    @staticmethod
    def _regions(model, memory, grid_shape: tuple[int, int], boxes: jax.Array) -> jax.Array:
        """Prompter memory + boxes [B, M, 4] -> unit region embeddings [B, M, E]."""
        pooled, _ = model.prompter.pool(memory, model.prompter.box_prompts(boxes), grid_shape, boxes)
        return normalize(model.prompter.embed(pooled).astype(jnp.float32))

    @staticmethod
    def _ground(model, memory, grid_shape: tuple[int, int], text_embeddings: jax.Array) -> jax.Array:
        """Prompter memory + text embeddings [B, M, E] -> boxes [B, M, 4]."""
        pooled, attention = model.prompter.pool(memory, model.prompter.text_prompts(text_embeddings), grid_shape)
        return model.prompter.box_head(pooled, attention, grid_shape)


def _cells(model, images: jax.Array) -> tuple[tuple[int, int], jax.Array]:
    """The token grid (h, w) of `images` [B, H, W, 3] and its cells as boxes [B, h * w, 4]."""
    patch = model.image.size().patch
    h, w = images.shape[1] // patch, images.shape[2] // patch
    return (h, w), jnp.broadcast_to(jnp.asarray(cell_boxes(h, w)), (images.shape[0], h * w, 4))


HEADS = {
    "prompter": PrompterHead("prompter", "the Prompter", "coverage", trains=True, can_ground=True),
    "roi_align": RegionHead("roi_align", "RoIAlign", "roi_align", trains=True, can_ground=False),
    "none": RegionHead("none", "box pooling through the image head", "coverage", trains=False, can_ground=False),
}


def region_head(name: str) -> RegionHead:
    if name not in HEADS:
        raise ValueError(f"model.region_extractor={name!r}; choose one of {tuple(HEADS)}")
    return HEADS[name]
