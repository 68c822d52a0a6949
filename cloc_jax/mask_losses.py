"""Mask2Former's set-prediction losses for the open-vocabulary mask decoder: match, then classify and segment.

Each image's G target segments (instance masks and stuff regions, padded with invalid slots) are matched one to one
with the Q query predictions by the Hungarian algorithm on Mask2Former's cost (2 class + 5 mask BCE + 5 dice,
`matching.py`, on device); matched queries learn their segment's class and mask, the others the void class
(weighted 0.1). Mask terms are computed at every pixel of the prediction's resolution (1/4 of the input), not at
Mask2Former's 12,544 sampled points: with static shapes that is one matmul per cost, and at 1/4 resolution a
1,024 px image has 65,536 pixels a mask (Q masks of an image: 26 MB in float32), so sampling saves little.
Targets are the masks' area fractions at that resolution (soft targets in [0, 1]).
"""

import dataclasses

import jax
import jax.numpy as jnp

from cloc_jax.matching import linear_sum_assignment


@dataclasses.dataclass(frozen=True)
class MaskLossWeights:
    """Mask2Former's weights (config `dense.loss`)."""

    classification: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    void: float = 0.1  # the void class's weight in the classification loss (DETR's eos_coef)


def pairwise_mask_costs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [Q, P], targets [G, P] in [0, 1] -> (mean BCE [G, Q], dice loss [G, Q]) of every pair."""
    pixels = logits.shape[-1]
    bce = (jax.nn.softplus(logits).sum(-1)[None, :] - targets @ logits.T) / pixels
    probs = jax.nn.sigmoid(logits)
    dice = 1 - (2 * targets @ probs.T + 1) / (targets.sum(-1)[:, None] + probs.sum(-1)[None, :] + 1)
    return bce, dice


def mask_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[..., P] logits and targets -> [...] the mean binary cross-entropy over pixels."""
    return (jax.nn.softplus(logits) - logits * targets).mean(-1)


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[..., P] -> [...] 1 - (2 |p t| + 1) / (|p| + |t| + 1), p = sigmoid(logits)."""
    probs = jax.nn.sigmoid(logits)
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def match(class_logits, mask_logits, labels, targets, valid, weights: MaskLossWeights) -> jax.Array:
    """One image: class_logits [Q, C + 1], mask_logits [Q, P], labels [G], targets [G, P], valid [G] -> the query
    of each target [G] (invalid targets take leftover queries: their cost rows are constant)."""
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), -1)
    bce, dice = pairwise_mask_costs(mask_logits.astype(jnp.float32), targets)
    cost = -weights.classification * probs[:, jnp.clip(labels, 0)].T + weights.mask * bce + weights.dice * dice
    return linear_sum_assignment(jnp.where(valid[:, None], cost, 0.0))


def set_losses(class_logits, mask_logits, labels, targets, valid, weights: MaskLossWeights) -> dict:
    """A batch of one decoder layer's predictions: class_logits [B, Q, C + 1] (void last), mask_logits [B, Q, P],
    targets labels [B, G] (class indices), masks [B, G, P] in [0, 1], valid [B, G] -> {"classification", "mask",
    "dice"} (mask terms: summed over matched targets / the batch's number of targets, as Mask2Former averages)."""
    class_logits, mask_logits = class_logits.astype(jnp.float32), mask_logits.astype(jnp.float32)
    matcher = jax.vmap(lambda c, m, lab, t, v: match(c, m, lab, t, v, weights))
    queries = jax.lax.stop_gradient(matcher(class_logits, mask_logits, labels, targets, valid))
    void = class_logits.shape[-1] - 1
    matched = jax.vmap(lambda q, lab, v: jnp.full((class_logits.shape[1],), void).at[q].set(jnp.where(v, lab, void)))
    wanted = matched(queries, labels, valid)  # [B, Q]: each query's class, void when unmatched
    nll = -jnp.take_along_axis(jax.nn.log_softmax(class_logits, -1), wanted[..., None], -1)[..., 0]
    class_weight = jnp.where(wanted == void, weights.void, 1.0)
    picked = jnp.take_along_axis(mask_logits, queries[..., None], 1)  # [B, G, P]
    count = jnp.maximum(valid.sum(), 1)
    return dict(
        classification=(class_weight * nll).sum() / class_weight.sum(),
        mask=jnp.where(valid, mask_bce(picked, targets), 0).sum() / count,
        dice=jnp.where(valid, dice_loss(picked, targets), 0).sum() / count,
    )


def decoder_loss(class_logits, mask_logits, labels, targets, valid, weights: MaskLossWeights) -> tuple:
    """Every decoder layer's predictions [L, B, Q, ...] (deep supervision, as Mask2Former) -> (loss, metrics): the
    weighted sum over layers; metrics report the last layer's terms."""
    per_layer = jax.vmap(lambda c, m: set_losses(c, m, labels, targets, valid, weights))(class_logits, mask_logits)
    scale = {"classification": weights.classification, "mask": weights.mask, "dice": weights.dice}
    loss = sum(scale[k] * v.sum() for k, v in per_layer.items())
    return loss, {f"loss/{k}": v[-1] for k, v in per_layer.items()}
