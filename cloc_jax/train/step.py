"""The training step: forward, losses, gradients, optimizer update, and the guard against non-finite steps."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cloc_jax import guards
from cloc_jax.losses import training_loss
from cloc_jax.models.build import model_inputs
from cloc_jax.models.cloc import Model
from cloc_jax.optim import learning_rate
from cloc_jax.train import accumulate
from cloc_jax.train.state import TrainState


def make_gradients(config: ml_collections.ConfigDict, model: Model, tag_tokens: np.ndarray | None = None):
    """-> gradients(params, batch) -> (loss, loss parts, model outputs, gradients) of the whole batch: in one
    pass, or with `optim.accum_steps` = k > 1 exactly the same, k micro-batches at a time (`accumulate.py`)."""
    tags_cfg = config.tags if tag_tokens is not None else None
    accum = config.optim.accum_steps

    def forward(params, batch):
        return model.apply({"params": params}, **model_inputs(model, batch), tag_tokens=tag_tokens)

    def gradients(params, batch):
        if accum > 1:
            loss_fn = lambda out: training_loss(out, batch, config.region_loss, config.contrastive, tags_cfg)  # noqa: E731
            return accumulate.loss_and_grads(forward, loss_fn, params, batch, accum)

        def loss_fn(params):
            out = forward(params, batch)
            loss, parts = training_loss(out, batch, config.region_loss, config.contrastive, tags_cfg)
            return loss, (out, parts)

        (loss, (out, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, parts, out, grads

    return gradients


def make_train_step(
    config: ml_collections.ConfigDict,
    model: Model,
    tx: optax.GradientTransformation,
    tag_tokens: np.ndarray | None = None,
):
    """-> train_step(state, batch) -> (state, metrics), to be jitted (the loop donates the state).

    The batch is `build.example_batch`'s contract, sharded over the mesh's batch axes. The loss is
    `losses.training_loss` (image-text, region-text, grounding, tags, as the config weighs them); `tag_tokens`
    [T, L'] (`pipeline.tag_vocabulary`, None without tag losses) is a constant of the step. After the update
    the temperature is clamped (`Model.clamp_logit_scale`). A step whose loss, gradient or new parameters are not
    finite changes nothing and is counted (`nonfinite/*` metrics; the loop stops after
    `optim.max_nonfinite_steps` in a row). With `optim.accum_steps` = k > 1 the gradient is still the whole
    batch's, computed k micro-batches at a time (`accumulate.loss_and_grads`)."""
    gradients = make_gradients(config, model, tag_tokens)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, parts, out, grads = gradients(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = model.clamp_logit_scale(optax.apply_updates(state.params, updates))
        new, guard = guarded_update(state, loss, grads, params, opt_state)
        metrics = {
            **parts,
            "loss": loss,
            **guard,
            "temperature": 1.0 / out["scale"],
            "lr": learning_rate(config.optim, config.num_steps, state.step),
        }
        return new, metrics

    return train_step


def guarded_update(state: TrainState, loss, grads, params, opt_state) -> tuple[TrainState, dict]:
    """The next state with the updated `params` and `opt_state`, unless the loss, the gradient or the new parameters
    are not finite: then the old ones, counted -> (state, {"grad_norm", "nonfinite/in_a_row",
    "nonfinite/skipped_steps"})."""
    grad_norm = optax.global_norm(grads)
    # optax.apply_if_finite looks at the gradients only: an update that overflows the parameters would pass
    # it. One norm per tree, not one test per array: each is one reduction (and one all-reduce) whatever the
    # number of arrays; a norm is finite exactly when every element is (or it overflows: diverged).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(params))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1)
    total = state.nonfinite_total + (~finite).astype(jnp.int32)
    new = TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), in_a_row, total)
    return new, {"grad_norm": grad_norm, "nonfinite/in_a_row": in_a_row, "nonfinite/skipped_steps": total}


def compile_step(config, model, tx, state: TrainState, batch: dict, tag_tokens: np.ndarray | None = None):
    """The jitted, donated train step compiled for these shapes, after checking it fits in device memory."""
    step = make_train_step(config, model, tx, tag_tokens)
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    guards.check_step_memory(compiled, jax.local_devices()[0])
    return compiled
