"""Image-text contrastive losses over the global batch.

Under jit with a batch sharded over the `data` axis these arrays are global: XLA gathers what the
[B, B] similarity needs. The ring-chunked version that never materialises [B, B] comes with scale.
"""

import jax
import jax.numpy as jnp
import optax


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
