"""Training: sharded state creation, the jit-compiled step, and the loop (logging, evals, checkpoints)."""

import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from cloc_jax import convert, evals, guards, sharding, tokenizers
from cloc_jax.checkpoint import Checkpoints
from cloc_jax.convert import layout
from cloc_jax.convert.layout import Weights
from cloc_jax.data import pipeline
from cloc_jax.inference import Encoder
from cloc_jax.losses import training_loss
from cloc_jax.metrics import MetricWriter
from cloc_jax.models.cloc import Model
from cloc_jax.models.spec import adopt_architecture, build_from_spec, model_spec
from cloc_jax.models.vit import merge_clustered_encoder
from cloc_jax.optim import learning_rate, make_optimizer


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_in_a_row: jax.Array  # steps skipped for a non-finite loss, gradient or update, up to now
    nonfinite_total: jax.Array


def build(config: ml_collections.ConfigDict):
    """Config -> (tokenizer, model, optimizer): the objects every entry point needs."""
    tokenizer, model = build_from_spec(model_spec(config))
    return tokenizer, model, make_optimizer(config.optim, config.num_steps)


def model_inputs(config: ml_collections.ConfigDict, batch: dict) -> dict:
    """The batch fields the model reads (regions only when it has a region extractor)."""
    inputs = dict(images=batch["image"], tokens=batch["tokens"])
    if config.model.region_extractor != "none":
        inputs.update(boxes=batch["boxes"], region_tokens=batch["region_tokens"])
    return inputs


def dummy_batch(config: ml_collections.ConfigDict, batch: int = 1) -> dict:
    """Zeros shaped like a real batch (for initialisation and compilation)."""
    side, m = config.image_size, config.data.max_regions
    tags = {}
    if pipeline.tags_enabled(config):
        num_tags = len(pipeline.tag_names(config))
        tags["image_tags"] = jnp.zeros((batch, num_tags), jnp.float32)
        tags["image_tags_valid"] = jnp.zeros((batch,), bool)
    return dict(
        **tags,
        image=jnp.zeros((batch, side, side, 3), jnp.float32),
        tokens=jnp.zeros((batch, config.tokenizer.context_length), jnp.int32),
        boxes=jnp.zeros((batch, m, 4), jnp.float32),
        region_mask=jnp.zeros((batch, m), bool),
        region_labels=jnp.full((batch, m), -1, jnp.int32),
        region_tokens=jnp.zeros((batch, m, config.tokenizer.region_context_length), jnp.int32),
    )


def abstract_state(config, model: Model, tx: optax.GradientTransformation, mesh):
    """(init function, state shapes with their NamedShardings): parameters are born sharded."""

    def init(rng):
        params = model.init(rng, **model_inputs(config, dummy_batch(config)))["params"]
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, tx.init(params), nonfinite_in_a_row=zero, nonfinite_total=zero)

    boxed = jax.eval_shape(lambda: init(jax.random.key(0)))  # traced: works for abstract (AOT) devices too
    shardings = sharding.logical_shardings(boxed, mesh, config.axis_rules)
    unboxed = lambda rng: nn.unbox(init(rng))  # noqa: E731
    shapes = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), sharding.unbox(boxed), shardings
    )
    return unboxed, shapes


def init_state(config, model: Model, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, Any]:
    """A freshly initialised, already-sharded TrainState, and its sharded shapes (for restoring)."""
    init, shapes = abstract_state(config, model, tx, mesh)
    state = jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, shapes))(jax.random.key(config.seed))
    return state, shapes


def init_from(state: TrainState, pretrained: Weights, scan: bool) -> TrainState:
    """Copies a checkpoint's parameters (`convert.read` of any `load` source: an export, hf:, open_clip:,
    big_vision:) into a fresh state, each array put straight from host memory onto its sharding (no
    device ever holds the whole model).

    Parameters the new model adds (Prompter, box head, adapters) keep their initialisation; a
    checkpoint parameter the new model lacks, or one with another shape, is an error. A model trained
    with token clustering can continue without it (its two encoder stacks become one)."""
    loaded, source = pretrained.params, pretrained.source
    fresh = flax.traverse_util.flatten_dict(state.params, sep="/")
    if any("encoder_clustered" in k for k in loaded) and not any("encoder_clustered" in k for k in fresh):
        loaded = merge_clustered_encoder(loaded)  # trained with token clustering, continued without
    loaded = layout.to_layout(loaded, scan)
    if missing := sorted(set(loaded) - set(fresh)):
        raise ValueError(f"init_from={source}: the model has no parameter {missing[0]} (different model?)")
    for key, value in loaded.items():
        if value.shape != fresh[key].shape:
            raise ValueError(f"init_from={source}: {key} is {value.shape}, the model wants {fresh[key].shape}")
        fresh[key] = jax.device_put(np.asarray(value, fresh[key].dtype), fresh[key].sharding)
    print(f"Initialised {len(loaded)} of {len(fresh)} parameter arrays from {source}")
    return state.replace(params=flax.traverse_util.unflatten_dict(fresh, sep="/"))


def make_train_step(config: ml_collections.ConfigDict, model: Model, tx: optax.GradientTransformation):
    tags = None
    if pipeline.tags_enabled(config):  # the tag vocabulary is a constant of the step
        tags = np.asarray(pipeline.tag_tokens(config, tokenizers.from_spec(config.tokenizer.to_dict())))

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params):
            out = model.apply({"params": params}, **model_inputs(config, batch), tag_tokens=tags)
            loss, parts = training_loss(
                out, batch, config.region_loss, config.contrastive, config.tags if tags is not None else None
            )
            return loss, (out, parts)

        (loss, (out, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = model.clamp_logit_scale(optax.apply_updates(state.params, updates))
        grad_norm = optax.global_norm(grads)
        # A step with a non-finite loss, gradient or new parameter changes nothing (optax.apply_if_finite
        # looks at the gradients only: an update that overflows the parameters would pass it).
        # One norm per tree, not one test per array: each is one reduction (and one all-reduce) whatever
        # the number of arrays; a norm is finite exactly when every element is (or it overflows: diverged).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(params))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1)
        total = state.nonfinite_total + (~finite).astype(jnp.int32)
        metrics = {
            **parts,
            "loss": loss,
            "grad_norm": grad_norm,
            "temperature": 1.0 / out["scale"],
            "lr": learning_rate(config.optim, config.num_steps, state.step),
            "nonfinite/in_a_row": in_a_row,
            "nonfinite/skipped_steps": total,
        }
        new = TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), in_a_row, total)
        return new, metrics

    return train_step


def input_stall(before: float, previous_outputs: dict | None) -> float:
    """Seconds the devices sat idle for the batch just fetched since `before`. Dispatch is asynchronous,
    so the loop often runs ahead and waits in `next()` while the previous step still computes: that wait
    costs nothing and is not counted. Once the previous step has finished, the whole wait counts (an
    upper bound: the step may have finished partway)."""
    waited = time.perf_counter() - before
    if previous_outputs is None:
        return waited
    return waited if all(x.is_ready() for x in jax.tree.leaves(previous_outputs)) else 0.0


def check_host_memory(config: ml_collections.ConfigDict) -> None:
    """Before any batch is built: the input pipeline's batches fit in this host's memory."""
    per_host = pipeline.per_host_batch_size(config.batch_size)
    shapes = jax.eval_shape(lambda: dummy_batch(config, per_host))
    guards.check_host_memory(guards.array_bytes(shapes), per_host, config.image_size)


def compile_step(config, model, tx, state: TrainState, batch: dict):
    """The jitted, donated train step compiled for these shapes, after checking it fits in device memory."""
    compiled = jax.jit(make_train_step(config, model, tx), donate_argnums=0).lower(state, batch).compile()
    guards.check_step_memory(compiled, jax.local_devices()[0])
    return compiled


def initial_state(config, model, tx, mesh, ckpt: Checkpoints, spec: dict, pretrained, data_iter) -> TrainState:
    """The newest readable checkpoint of this run (advancing `data_iter` to its position), else a fresh
    state, initialised from `pretrained` weights if given."""
    latest, state = ckpt.restore_newest(abstract_state(config, model, tx, mesh)[1], data_iter, spec)
    if latest is not None:
        print(f"Resumed from {ckpt.directory} at step {latest}")
        return state
    state, _ = init_state(config, model, tx, mesh)
    return init_from(state, pretrained, config.model.scan) if pretrained is not None else state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains to `config.num_steps`, resuming from `<workdir>/checkpoints` if present; returns final evals.

    SIGTERM or SIGINT: the current step finishes and is saved, and the function returns early (no evals).
    `optim.max_nonfinite_steps` skipped (non-finite) steps in a row raise `guards.RunError`."""
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    ckpt = Checkpoints(workdir, config.keep_checkpoints, config.checkpoint_every)
    pretrained = None
    if config.init_from:  # the architecture comes from the weights (resuming: from the run's own checkpoint)
        saved_spec = ckpt.newest_readable(ckpt.spec)[1]
        pretrained = convert.read(config.init_from) if saved_spec is None else None
        with config.unlocked():
            adopt_architecture(config, saved_spec or pretrained.spec, config.init_from)
    tokenizer, model, tx = build(config)
    spec = model_spec(config)
    if config.eval_every and config.evals and not config.data.heldout:
        print("No evaluation during training: data.heldout is unset", flush=True)
    pipeline.check_split_set(config.data, "train")  # what to pass comes before what cannot fit
    check_host_memory(config)
    data_stats = pipeline.DataStats()
    data_iter = pipeline.train_iterator(config, tokenizer, data_stats)  # a source that yields nothing stops here
    writer = MetricWriter(workdir)
    preemption = guards.Preemption(ckpt.manager)
    results: dict[str, float] = {}
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
            state = initial_state(config, model, tx, mesh, ckpt, spec, pretrained, data_iter)
            context = config.tokenizer.context_length
            encoder = Encoder(model, state.params, tokenizer, context, config.image_size, config.axis_rules)
            evaluator = evals.device_for(config, encoder, mesh) if config.eval_every and config.evals else None
            first = int(state.step)
            progress = tqdm(
                range(first, config.num_steps),
                initial=first,
                total=config.num_steps,
                desc="train",
                disable=jax.process_index() != 0,
                mininterval=1 if sys.stderr.isatty() else 60,  # a log file gets a line a minute, not a flood
            )
            tick, tick_step, waited = time.perf_counter(), first, 0.0
            metrics = None  # the last dispatched step's outputs: tell a real input stall from running ahead
            step_fn = None
            for step in progress:
                before = time.perf_counter()
                local = next(data_iter)
                waited += input_stall(before, metrics)
                batch = sharding.global_batch(local, mesh)
                if step_fn is None:  # compiled once, checked against device memory before it runs
                    step_fn = compile_step(config, model, tx, state, batch)
                previous = metrics
                state, metrics = step_fn(state, batch)
                done = step + 1
                # The step before this one has finished or nearly: reading its count keeps dispatch ahead.
                guards.check_nonfinite(previous, done - 1, config.optim.max_nonfinite_steps, ckpt.latest_step())
                if step == first:  # compilation is not throughput
                    jax.block_until_ready(metrics)
                    tick, tick_step, waited = time.perf_counter(), done, 0.0
                if done % config.log_every == 0 or done == config.num_steps:
                    row = jax.device_get(metrics)
                    now = time.perf_counter()
                    row.update(data_stats.snapshot())  # repaired and skipped inputs so far (this process)
                    if done > tick_step:
                        row["images_per_s"] = (done - tick_step) * config.batch_size / (now - tick)
                        row["data/wait_fraction"] = waited / (now - tick)  # share of wall time the devices waited
                    tick, tick_step, waited = now, done, 0.0
                    writer.write(done, row, echo=progress.write)
                    progress.set_postfix(loss=f"{row['loss']:.3f}")
                stopping = preemption.requested(done)
                if config.eval_every and not stopping and (done % config.eval_every == 0 or done == config.num_steps):
                    evaluator.set_params(state.params)
                    results = evals.run_all(config, evaluator)
                    writer.write(done, results, echo=progress.write)
                    tick, waited = time.perf_counter(), 0.0  # evaluation time is not training throughput
                saved = ckpt.save(done, state, data_iter, spec, force=done == config.num_steps)
                if stopping:
                    if not saved and ckpt.latest_step() != done:
                        ckpt.save(done, state, data_iter, spec, force=True)
                    ckpt.wait()
                    progress.close()
                    print(f"Stopped by a signal after step {done}, saved in {ckpt.directory}; rerun to resume")
                    break
            else:
                guards.check_nonfinite(metrics, config.num_steps, config.optim.max_nonfinite_steps, ckpt.latest_step())
            progress.close()
    finally:
        preemption.close()
        ckpt.wait()  # a save in flight is committed whatever stopped the run
        ckpt.close()
        writer.close()
    return results
