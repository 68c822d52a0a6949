"""Exact gradient accumulation for losses that couple the whole batch (GradCache; open_clip's `--accum-freq`).

Each example's contrastive loss depends on every other example's embedding, so averaging micro-batch losses
changes the objective. Instead: (1) embed every micro-batch without keeping activations; (2) compute the loss on
the whole batch's embeddings, and its gradient with respect to them; (3) run each micro-batch forward again and
backpropagate those embedding gradients through the towers, summing parameter gradients. The optimizer sees
the full-batch gradient, and only one micro-batch's activations are alive at a time.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Model outputs with one row per example (split and merged with the batch) and outputs every micro-batch computes
# the same (the temperature, SigLIP's bias, the tag vocabulary's embeddings): their gradient is taken once.
PER_EXAMPLE = ("zimg", "ztxt", "zregion", "zregion_text", "pred_boxes")
SHARED = ("scale", "bias", "ztag")


def split(tree, k: int):
    """Leaves [B, ...] -> [k, B/k, ...]. Micro-batch j holds rows j, j + k, j + 2k, ...: each spreads over the
    data-parallel devices as the batch does (a contiguous slice would sit on 1/k of them)."""

    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"optim.accum_steps={k} does not divide the batch of {x.shape[0]}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(one, tree)


def merge(tree):
    """The inverse of `split`: [k, B/k, ...] -> [B, ...] in the batch's order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def loss_and_grads(
    forward: Callable[[dict, dict], dict], loss_fn: Callable[[dict], tuple], params: dict, batch: dict, k: int
):
    """-> (loss, aux, outputs, grads), as `jax.value_and_grad` of loss_fn(forward(params, batch)) would give them
    (to float reordering), with `k` micro-batches. forward(params, batch) -> model outputs; loss_fn(outputs) ->
    (loss, aux). Only PER_EXAMPLE and SHARED outputs reach loss_fn."""

    def embed(p, micro):
        out = forward(p, micro)
        return {n: out[n] for n in PER_EXAMPLE if n in out}, {n: out[n] for n in SHARED if n in out}

    micros = split(batch, k)
    per_example, shared = jax.lax.map(lambda micro: embed(params, micro), micros)
    per_example, shared = merge(per_example), jax.tree.map(lambda x: x[0], shared)  # shared: equal in every one
    loss, pullback, aux = jax.vjp(lambda per, sh: loss_fn({**per, **sh}), per_example, shared, has_aux=True)
    d_per, d_shared = pullback(jnp.ones_like(loss))

    def backward(grads, xs):
        micro, d_micro, first = xs
        _, vjp_params = jax.vjp(lambda p: embed(p, micro), params)
        (g,) = vjp_params((d_micro, jax.tree.map(lambda d: d * first, d_shared)))  # shared outputs: once
        return jax.tree.map(jnp.add, grads, g), None

    firsts = (jnp.arange(k) == 0).astype(jnp.float32)
    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params), (micros, split(d_per, k), firsts))
    return loss, aux, {**per_example, **shared}, grads
