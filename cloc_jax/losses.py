"""Image-text contrastive losses over the global batch.

Under jit with a batch sharded over the `data` axis these arrays are global: XLA gathers what the
[B, B] similarity needs. The ring-chunked version that never materialises [B, B] comes with scale.
"""

import jax
import jax.numpy as jnp
import optax

from cloc_jax.boxes import iou_and_giou


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


def image_text_loss(out: dict[str, jax.Array]) -> jax.Array:
    """Dispatches on whether the model has a SigLIP bias (the model's `loss` setting decides)."""
    if "bias" in out:
        return sigmoid_siglip_loss(out["zimg"], out["ztxt"], out["scale"], out["bias"])
    return softmax_clip_loss(out["zimg"], out["ztxt"], out["scale"])


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


def training_loss(out: dict[str, jax.Array], batch: dict[str, jax.Array], cfg) -> tuple[jax.Array, dict]:
    """L = L_CLIP + lambda (L_region + w L_grounding), lambda = weight x fraction of images with regions."""
    loss = image_text_loss(out)
    metrics = {"loss/image_text": loss}
    if "zregion" not in out:
        return loss, metrics
    boxes = batch["boxes"]
    valid = (batch["region_mask"] & jnp.isfinite(boxes).all(-1)).reshape(-1)  # a NaN box never reaches a loss
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    region = region_text_loss(
        flat(out["zregion"]), flat(out["zregion_text"]), valid, out["scale"], cfg.filter_threshold
    )
    target = jnp.where(valid[:, None], flat(boxes), 0.0)
    ground = grounding_loss(flat(out["pred_boxes"]), target, valid, cfg.grounding)
    lam = cfg.weight * jnp.mean(valid.reshape(boxes.shape[:2]).any(axis=1))
    metrics.update({"loss/region": region, "loss/grounding": ground})
    return loss + lam * (region + cfg.grounding_weight * ground), metrics
