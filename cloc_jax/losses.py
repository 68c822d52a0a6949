"""Contrastive (image-text, region-text) and grounding losses.

Two implementations of each contrastive loss, chosen by `config.contrastive`:
- "global": under jit the sharded embeddings are global arrays and XLA gathers what the [B, B]
  similarity needs. Simple, and the reference.
- "ring": shard_map over the batch axes; each device keeps its own rows and the other devices'
  embedding chunks travel around a ring (ppermute), so a device only ever holds [b, b] logits
  (b = B / devices) and log-sum-exps are accumulated chunk by chunk. Same values and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from cloc_jax.boxes import iou_and_giou
from cloc_jax.sharding import BATCH_AXES

CONTRASTIVE = ("global", "ring")


def softmax_clip_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE. zimg, ztxt: [B, E] unit vectors; scale: logit temperature (scalar)."""
    logits = scale * zimg @ ztxt.T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return (i2t.mean() + t2i.mean()) / 2


def sigmoid_siglip_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP: every pair is an independent binary problem; summed over texts, averaged over images."""
    logits = scale * zimg @ ztxt.T + bias
    signs = 2 * jnp.eye(logits.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def _ring(local_fn, *arrays, scalars=()):
    """shard_map of `local_fn(ring, *local_arrays, *scalars)` over the batch axes of the current mesh.

    `ring(carry, chunks, fn)` runs `fn(carry, chunks, k)` for k = 0..n-1 while `chunks` (arrays of
    the device k steps back along the ring) rotate; its body is rematerialised, so the backward pass
    keeps the travelling chunks, never the [b, b] blocks."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError('contrastive="ring" needs a mesh (jax.set_mesh) with the batch axes')
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    perm = [(i, (i + 1) % n) for i in range(n)]

    def ring(carry, chunks, fn):
        def body(state, k):
            carry, chunks = state
            carry = fn(carry, chunks, k)
            chunks = jax.tree.map(lambda x: jax.lax.ppermute(x, BATCH_AXES, perm), chunks)
            return (carry, chunks), None

        return jax.lax.scan(jax.checkpoint(body), (carry, chunks), jnp.arange(n))[0][0]

    specs = (P(BATCH_AXES),) * len(arrays) + (P(),) * len(scalars)
    fn = jax.shard_map(lambda *xs: local_fn(ring, *xs), in_specs=specs, out_specs=P())
    return fn(*arrays, *scalars)


def ring_softmax_loss(
    za: jax.Array, zb: jax.Array, valid: jax.Array, scale: jax.Array, filter_threshold: float | None = None
) -> jax.Array:
    """The ring version of the symmetric InfoNCE (image-text with all rows valid and no filter, or
    region-text with padding and negative filtering). za, zb [R, E] sharded over the batch axes."""

    def local(ring, za, zb, valid, scale):
        eye = jnp.eye(za.shape[0], dtype=bool)

        def accumulate(lses, chunk, k):
            ca, cb, cv = chunk
            allowed = valid[:, None] & cv[None, :]
            if filter_threshold is not None:
                similar = jax.lax.stop_gradient(zb @ cb.T) > filter_threshold
                allowed &= ~similar | (eye & (k == 0))
            a2b = jnp.where(allowed, scale * za @ cb.T, -1e9)
            b2a = jnp.where(allowed, scale * zb @ ca.T, -1e9)
            return tuple(jnp.logaddexp(lse, jax.nn.logsumexp(x, axis=1)) for lse, x in zip(lses, (a2b, b2a)))

        start = jnp.full_like(za[:, 0], -jnp.inf)  # derived from za: varies over the ring like the chunks
        lse_a, lse_b = ring((start, start), (za, zb, valid), accumulate)
        positive = scale * jnp.sum(za * zb, axis=-1)
        total = jnp.sum(jnp.where(valid, lse_a + lse_b - 2 * positive, 0.0))
        count = jax.lax.psum(valid.sum(), BATCH_AXES)
        return jax.lax.psum(total, BATCH_AXES) / (2 * jnp.maximum(count, 1))

    return _ring(local, za, zb, valid, scalars=(scale,))


def ring_sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """The ring version of `sigmoid_siglip_loss` (big_vision's chunked SigLIP)."""

    def local(ring, zimg, ztxt, scale, bias):
        eye = jnp.eye(zimg.shape[0], dtype=bool)

        def accumulate(total, chunk, k):
            signs = jnp.where(eye & (k == 0), 1.0, -1.0)
            return total + jnp.sum(jax.nn.log_sigmoid(signs * (scale * zimg @ chunk.T + bias)))

        total = ring(jnp.zeros_like(zimg[0, 0]), ztxt, accumulate)
        return -jax.lax.psum(total, BATCH_AXES) / jax.lax.psum(zimg.shape[0], BATCH_AXES)

    return _ring(local, zimg, ztxt, scalars=(scale, bias))


def image_text_loss(out: dict[str, jax.Array], contrastive: str = "global") -> jax.Array:
    """Dispatches on whether the model has a SigLIP bias (the model's `loss` setting decides)."""
    if contrastive not in CONTRASTIVE:
        raise ValueError(f"contrastive={contrastive!r}; choose one of {CONTRASTIVE}")
    zimg, ztxt, scale = out["zimg"], out["ztxt"], out["scale"]
    if contrastive == "ring":
        if "bias" in out:
            return ring_sigmoid_loss(zimg, ztxt, scale, out["bias"])
        return ring_softmax_loss(zimg, ztxt, jnp.ones(zimg.shape[:1], bool), scale)
    if "bias" in out:
        return sigmoid_siglip_loss(zimg, ztxt, scale, out["bias"])
    return softmax_clip_loss(zimg, ztxt, scale)


def region_text_loss(
    zregion: jax.Array, ztext: jax.Array, valid: jax.Array, scale: jax.Array, filter_threshold: float = 0.9
) -> jax.Array:
    """Symmetric InfoNCE between regions and their texts; negatives are all regions of the global batch.

    zregion, ztext [R, E] unit vectors (R = B x M, flattened); valid [R] masks padding. A pair whose
    texts are more similar than `filter_threshold` is not a negative (two regions both called "red
    circle" should not be pushed apart); the check carries no gradient.
    """
    logits = scale * zregion @ ztext.T
    text_sim = jax.lax.stop_gradient(ztext @ ztext.T)
    eye = jnp.eye(logits.shape[0], dtype=bool)
    allowed = valid[:, None] & valid[None, :] & ((text_sim <= filter_threshold) | eye)
    logits = jnp.where(allowed, logits, -1e9)
    labels = jnp.arange(logits.shape[0])
    r2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2r = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    count = jnp.maximum(valid.sum(), 1)
    return (jnp.sum(jnp.where(valid, r2t, 0.0)) + jnp.sum(jnp.where(valid, t2r, 0.0))) / (2 * count)


GROUNDING = ("l2", "l1_giou")


def grounding_loss(pred: jax.Array, target: jax.Array, valid: jax.Array, kind: str = "l2") -> jax.Array:
    """pred, target [R, 4] xyxy in [0, 1]; valid [R]. "l2": squared error summed over coordinates (the
    paper); "l1_giou": L1 + (1 - GIoU), as in DETR. Averaged over valid regions."""
    if kind not in GROUNDING:
        raise ValueError(f"region_loss.grounding={kind!r}; choose one of {GROUNDING}")
    if kind == "l2":
        per_box = jnp.sum((pred - target) ** 2, axis=-1)
    else:
        per_box = jnp.sum(jnp.abs(pred - target), axis=-1) + 1.0 - iou_and_giou(pred, target)[1]
    return jnp.sum(jnp.where(valid, per_box, 0.0)) / jnp.maximum(valid.sum(), 1)


def tag_loss(z: jax.Array, ztag: jax.Array, target: jax.Array, valid: jax.Array, beta: float) -> jax.Array:
    """UMG-CLIP's tag loss: Smooth L1 between cosine similarity and a multi-hot target (labels overlap,
    so each tag is its own regression). z [R, E], ztag [T, E] unit vectors, target [R, T], valid [R]:
    the mean over valid rows only (0, with zero gradient, when none is valid)."""
    per_tag = optax.huber_loss(z @ ztag.T, target, delta=beta) / beta
    return jnp.sum(jnp.where(valid[:, None], per_tag, 0.0)) / (jnp.maximum(valid.sum(), 1) * ztag.shape[0])


def _tag_losses(out: dict, batch: dict, tags) -> dict[str, jax.Array]:
    """Weighted image-tag and region-tag losses, keyed by metric name. Only images whose source has tags
    (`image_tags_valid` [B]) count: an untagged image's all-zero target means "unknown", not "none"."""
    losses = {}
    if tags.image_weight > 0:
        valid = batch["image_tags_valid"]
        losses["loss/image_tags"] = tag_loss(out["zimg"], out["ztag"], batch["image_tags"], valid, tags.beta)
    if tags.region_weight > 0:
        if "zregion" not in out:
            raise ValueError("tags.region_weight > 0 needs region embeddings: set model.region_extractor")
        labels = batch["region_labels"].reshape(-1)
        # Label -1 (padding, or no class known) is all zeros and masked; an untagged source's region labels
        # are -1 or real classes (COCO instances), both right as they are.
        target = jax.nn.one_hot(labels, out["ztag"].shape[0])
        z = out["zregion"].reshape(-1, out["zregion"].shape[-1])
        losses["loss/region_tags"] = tag_loss(z, out["ztag"], target, labels >= 0, tags.beta)
    return losses


def training_loss(
    out: dict[str, jax.Array], batch: dict[str, jax.Array], cfg, contrastive: str = "global", tags=None
) -> tuple[jax.Array, dict]:
    """L = L_CLIP + lambda (L_region + w L_grounding) + tag losses, lambda = weight x fraction of images
    with regions; `tags` (config.tags) weighs the image- and region-tag losses."""
    loss = image_text_loss(out, contrastive)
    metrics = {"loss/image_text": loss}
    if tags is not None:
        tag_terms = _tag_losses(out, batch, tags)
        metrics.update(tag_terms)
        weights = {"loss/image_tags": tags.image_weight, "loss/region_tags": tags.region_weight}
        loss = loss + sum(weights[k] * v for k, v in tag_terms.items())
    if "zregion" not in out:
        return loss, metrics
    boxes = batch["boxes"]
    valid = (batch["region_mask"] & jnp.isfinite(boxes).all(-1)).reshape(-1)  # a NaN box never reaches a loss
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    region_loss = ring_softmax_loss if contrastive == "ring" else region_text_loss
    region = region_loss(flat(out["zregion"]), flat(out["zregion_text"]), valid, out["scale"], cfg.filter_threshold)
    lam = cfg.weight * jnp.mean(valid.reshape(boxes.shape[:2]).any(axis=1))
    metrics["loss/region"] = region
    if "pred_boxes" not in out:  # RoIAlign regions have no grounding head
        return loss + lam * region, metrics
    target = jnp.where(valid[:, None], flat(boxes), 0.0)
    ground = grounding_loss(flat(out["pred_boxes"]), target, valid, cfg.grounding)
    metrics["loss/grounding"] = ground
    return loss + lam * (region + cfg.grounding_weight * ground), metrics
