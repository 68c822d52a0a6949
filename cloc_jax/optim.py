"""Optimizers: optax LAMB (default) or AdamW, warmup + cosine, per-tower learning rates, decay masks.

Weight decay applies to matrices only: never to norms, biases, position embeddings or the temperature.
LAMB's layer adaptation (the trust ratio |w| / |update|) follows the same rule, as BERT's and NVIDIA's
LAMB exclude norms and biases: it applies to matrices, per layer, and not to arrays that start at zero
(`layerwise_trust_ratio`). Everything else takes plain Adam steps.
A tower's `lr_mult` of 0 freezes it (LiT-style locking). `optim.trainable` (substrings of parameter
paths such as "adapter") trains only the matching parameters: parameter-efficient tuning, the rest
frozen by optax masks (no gradient step, no optimizer state, no say in gradient clipping).
"""

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cloc_jax import sharding

OPTIMIZERS = ("lamb", "adamw")
NO_DECAY = ("bias", "scale", "pos_embedding", "log_scale", "cls", "probe")
STACKED = "blocks"  # the module name of scanned layers: their arrays are [depth, ...]


def schedule(optim: ml_collections.ConfigDict, num_steps: int, lr: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=min(optim.warmup_steps, num_steps),
        decay_steps=max(num_steps, optim.warmup_steps + 1),
        end_value=lr * optim.end_lr_ratio,
    )


def decay_mask(params) -> dict:
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: k[-1] not in NO_DECAY for k in flat})


def _names(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _per_layer_axes(path, array) -> tuple[int, ...]:
    """The axes one layer's slice of `array` spans: all but the leading layer axis of scanned layers."""
    start = 1 if STACKED in _names(path) else 0
    return tuple(range(start, array.ndim))


class TrustRatioState(NamedTuple):
    started_at_zero: object  # per parameter: bool [depth] for scanned layers, else bool []


def layerwise_trust_ratio() -> optax.GradientTransformation:
    """LAMB's layer adaptation, one trust ratio |w| / |update| per layer and matrix.

    optax's `scale_by_trust_ratio` takes one norm over a whole array, so the [depth, ...] arrays of
    scanned layers would share one ratio and scan on/off would train different models; here the norms
    are taken per layer. Left out (ratio 1, a plain Adam step): anything with fewer than two axes per
    layer (norms, biases, the temperature, the SigLIP bias), position embeddings, the class token and the
    MAP probe (`NO_DECAY` names), and arrays initialised at zero (adapter up-projections, the box head's
    correction): relative to a zero weight, a trust ratio keeps them near zero for good."""

    def init(params):
        params = sharding.unbox(params)  # init may see boxed (logically partitioned) parameters
        zero = lambda path, p: jnp.all(p == 0, axis=_per_layer_axes(path, p))  # noqa: E731
        return TrustRatioState(jax.tree_util.tree_map_with_path(zero, params))

    def update(updates, state, params):
        def scale(path, u, p, started_at_zero):
            axes = _per_layer_axes(path, p)
            if len(axes) < 2 or _names(path)[-1] in NO_DECAY:
                return u
            w_norm = jnp.sqrt(jnp.sum(jnp.square(p), axis=axes))
            u_norm = jnp.sqrt(jnp.sum(jnp.square(u), axis=axes))
            adapt = (w_norm > 0) & (u_norm > 0) & ~started_at_zero
            ratio = jnp.where(adapt, w_norm / jnp.where(adapt, u_norm, 1.0), 1.0)
            return u * ratio.reshape(ratio.shape + (1,) * len(axes)).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates, params, state.started_at_zero), state

    return optax.GradientTransformation(init, update)


def lamb(optim: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    """optax.lamb with `layerwise_trust_ratio` in place of its whole-array trust ratio."""
    return optax.chain(
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
        layerwise_trust_ratio(),
        optax.scale_by_learning_rate(lr),
    )


def group_labels(patterns: tuple[str, ...] = ()):
    """params -> a label per parameter: 'frozen' when `patterns` is set and its path contains none of
    them; else its tower, 'image' / 'text', or 'shared' (temperature, heads)."""

    def labels(params) -> dict:
        def label(path: tuple) -> str:
            if patterns and not any(p in "/".join(map(str, path)) for p in patterns):
                return "frozen"
            return path[0] if path[0] in ("image", "text") else "shared"

        flat = flax.traverse_util.flatten_dict(params)
        return flax.traverse_util.unflatten_dict({k: label(k) for k in flat})

    return labels


def _base(optim: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim.name!r}; choose one of {OPTIMIZERS}")
    if optim.name == "lamb":
        return lamb(optim, lr)
    return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    labels = group_labels(tuple(optim.trainable))
    groups = {"frozen": optax.set_to_zero()}
    for group, mult in (("image", optim.image_lr_mult), ("text", optim.text_lr_mult), ("shared", 1.0)):
        groups[group] = optax.set_to_zero() if mult == 0 else _base(optim, schedule(optim, num_steps, optim.lr * mult))
    # Frozen gradients are zeroed before clipping, so they do not shrink the trained parameters' steps.
    freeze = optax.multi_transform({**{g: optax.identity() for g in groups}, "frozen": optax.set_to_zero()}, labels)
    return optax.chain(freeze, optax.clip_by_global_norm(optim.clip_norm), optax.multi_transform(groups, labels))


def learning_rate(optim: ml_collections.ConfigDict, num_steps: int, step: jax.Array) -> jax.Array:
    """The shared (base) learning rate at `step`, for logging."""
    return schedule(optim, num_steps, optim.lr)(step)
