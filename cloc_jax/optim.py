"""Optimizers: optax LAMB (default) or AdamW, warmup + cosine, per-tower learning rates, decay masks.

Weight decay applies to matrices only: never to norms, biases, position embeddings or the temperature.
A tower's `lr_mult` of 0 freezes it (LiT-style locking).
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


def tower_labels(params) -> dict:
    """'image' / 'text' for each tower's parameters, 'shared' for the rest (temperature, heads)."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: k[0] if k[0] in ("image", "text") else "shared" for k in flat})


def _base(optim: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim.name!r}; choose one of {OPTIMIZERS}")
    make = optax.lamb if optim.name == "lamb" else optax.adamw
    return make(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    groups = {}
    for group, mult in (("image", optim.image_lr_mult), ("text", optim.text_lr_mult), ("shared", 1.0)):
        groups[group] = optax.set_to_zero() if mult == 0 else _base(optim, schedule(optim, num_steps, optim.lr * mult))
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), optax.multi_transform(groups, tower_labels))


def learning_rate(optim: ml_collections.ConfigDict, num_steps: int, step: jax.Array) -> jax.Array:
    """The shared (base) learning rate at `step`, for logging."""
    return schedule(optim, num_steps, optim.lr)(step)
