"""From a spec (`models/spec.py`): the model, the one example batch, and the parameter shapes.

`example_batch` is the batch contract: what a training step reads, with its shapes and dtypes. Initialisation,
AOT compilation, export and the weight layout use it; the data pipeline's batches carry it (and bookkeeping
fields beside it: record index, class label, referring-expression tokens).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax import tokenizers
from cloc_jax.models.cloc import Model
from cloc_jax.models.heads import region_head
from cloc_jax.models.layers import TowerSettings
from cloc_jax.models.spec import ModelSpec, Spec, from_dict
from cloc_jax.models.text import TextTower
from cloc_jax.models.vit import ViT, vit_size
from cloc_jax.tokenizers import Tokenizer


def tower_settings(model: ModelSpec) -> TowerSettings:
    return TowerSettings(
        out_dim=model.embed_dim,
        activation=model.activation,
        ln_eps=model.ln_eps,
        dtype=jnp.dtype(model.dtype),
        scan=model.scan,
        remat=model.remat,
        attention=model.attention,
    )


def image_tower(model: ModelSpec) -> TowerSettings:
    """The image tower's settings: the shared ones, with its own LayerNorm epsilon where the spec gives one."""
    return dataclasses.replace(tower_settings(model), ln_eps=model.image.ln_eps or model.ln_eps)


def _check(spec: Spec) -> None:
    """One line for a spec no model can be built from."""
    tok, image = spec.tokenizer, spec.model.image
    if tok.region_context_length > tok.context_length:
        raise ValueError(
            f"tokenizer.region_context_length={tok.region_context_length} exceeds "
            f"tokenizer.context_length={tok.context_length}"
        )
    if 0 < tok.region_pack_length < tok.region_context_length:
        raise ValueError(
            f"tokenizer.region_pack_length={tok.region_pack_length} is shorter than one region text "
            f"(region_context_length={tok.region_context_length}); use 0 (no packing) or more"
        )
    patch = vit_size(image.variant, image.width, image.depth, image.heads, image.mlp_dim).patch
    if spec.image_size % patch:
        raise ValueError(f"image_size={spec.image_size} is not divisible by the patch size {patch} of {image.variant}")
    region_head(spec.model.region_extractor)


def build(spec: Spec | dict, tokenizer: Tokenizer | None = None) -> Model:
    """Spec -> model. Without `tokenizer` its file is read only when the model takes its vocabulary size from it
    (`model.text.vocab_size` = 0), so a config that states the size compiles (AOT) without the file."""
    spec = from_dict(spec)
    _check(spec)
    m = spec.model
    size = vit_size(m.image.variant, m.image.width, m.image.depth, m.image.heads, m.image.mlp_dim)
    tower, head = tower_settings(m), region_head(m.region_extractor)
    image_spec = dataclasses.replace(m.image, posemb_grid=m.image.posemb_grid or spec.image_size // size.patch)
    vocab = m.text.vocab_size or (tokenizer or tokenizers.from_spec(spec.tokenizer)).padded_vocab_size
    text_spec = dataclasses.replace(m.text, vocab_size=vocab)
    return Model(
        image=ViT(image_spec, image_tower(m), region_pool=head.image_pool, name="image"),
        text=TextTower(text_spec, tower, spec.tokenizer.context_length, name="text"),
        spec=m,
        prompter=head.module(size.width, m.embed_dim, tower.dtype),
        region_pack_length=spec.tokenizer.region_pack_length,
    )


def build_with_tokenizer(spec: Spec | dict) -> tuple[Tokenizer, Model]:
    """Spec -> (tokenizer, model): training, export, loading and imports all build models here."""
    spec = from_dict(spec)
    tokenizer = tokenizers.from_spec(spec.tokenizer)
    model = build(spec, tokenizer)
    check_vocabulary(tokenizer, model)
    return tokenizer, model


def check_vocabulary(tokenizer: Tokenizer, model: Model) -> None:
    """One line when the tokenizer makes ids the text tower has no embedding for."""
    if tokenizer.vocab_size > model.text.spec.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but model.text.vocab_size={model.text.spec.vocab_size}: "
            "set model.text.vocab_size=0 (the tokenizer's size) or the tokenizer's size"
        )


def example_batch(spec: Spec | dict, n: int, regions: int = 1, tags: int = 0) -> dict:
    """Zeros shaped like a training batch of `n` images with `regions` region slots (M) and a tag vocabulary of
    `tags` (T, 0: none): image [n, S, S, 3] float32 in [-1, 1], tokens [n, L] int32, boxes [n, M, 4] float32
    (xyxy in [0, 1]), region_mask [n, M] bool, region_labels [n, M] int32 (-1: none), region_tokens [n, M, L']
    int32; with tags, image_tags [n, T] float32 multi-hot and image_tags_valid [n] bool."""
    spec = from_dict(spec)
    side, tok = spec.image_size, spec.tokenizer
    out = {}
    if tags:
        out.update(image_tags=jnp.zeros((n, tags), jnp.float32), image_tags_valid=jnp.zeros((n,), bool))
    return dict(
        **out,
        image=jnp.zeros((n, side, side, 3), jnp.float32),
        tokens=jnp.zeros((n, tok.context_length), jnp.int32),
        boxes=jnp.zeros((n, regions, 4), jnp.float32),
        region_mask=jnp.zeros((n, regions), bool),
        region_labels=jnp.full((n, regions), -1, jnp.int32),
        region_tokens=jnp.zeros((n, regions, tok.region_context_length), jnp.int32),
    )


def model_inputs(model: Model, batch: dict) -> dict:
    """The batch fields the model's training forward reads: image, caption tokens and its head's fields."""
    return dict(images=batch["image"], tokens=batch["tokens"], **{k: batch[k] for k in model.head.batch_fields})


def init_params(model: Model, spec: Spec | dict, rng: jax.Array, regions: int = 1) -> dict:
    """Boxed parameters (logical axis names attached) of a fresh model, from the example batch."""
    return model.init(rng, **model_inputs(model, example_batch(spec, 1, regions)))["params"]


def abstract_params(model: Model, spec: Spec | dict, device=None) -> dict:
    """Parameter shapes (nested, unboxed) on one device (the first local one unless given); nothing allocated."""
    shapes = nn.unbox(jax.eval_shape(lambda: init_params(model, spec, jax.random.key(0))))
    device = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
