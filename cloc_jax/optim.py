"""Optimizers: optax LAMB (default) or AdamW, warmup + cosine, per-tower learning rates, decay masks.

Weight decay applies to matrices only: never to norms, biases, position embeddings or the temperature.
A tower's `lr_mult` of 0 freezes it (LiT-style locking). `optim.trainable` (substrings of parameter
paths such as "adapter") trains only the matching parameters: parameter-efficient tuning, the rest
frozen by optax masks (no gradient step, no optimizer state, no say in gradient clipping).
"""

import flax
import jax
import ml_collections
import optax

OPTIMIZERS = ("lamb", "adamw")
NO_DECAY = ("bias", "scale", "pos_embedding", "log_scale", "cls", "probe")


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
    make = optax.lamb if optim.name == "lamb" else optax.adamw
    return make(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)


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
