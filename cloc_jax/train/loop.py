"""The training loop: resume or initialise, then steps with logging, evaluation, checkpoints and pre-emption."""

import sys
import time

import flax.linen as nn
import jax
import ml_collections
from tqdm import tqdm

from cloc_jax import evals, guards, sharding, weights
from cloc_jax.checkpoint import Checkpoints
from cloc_jax.data import pipeline
from cloc_jax.inference import Encoder
from cloc_jax.metrics import MetricWriter
from cloc_jax.models.build import example_batch
from cloc_jax.models.spec import Spec, from_config
from cloc_jax.train.state import TrainState, abstract_state, adopt_architecture, build, init_from, init_state
from cloc_jax.train.step import compile_step


def input_stall(before: float, previous_outputs: dict | None) -> float:
    """Seconds the devices sat idle for the batch just fetched since `before`. Dispatch is asynchronous,
    so the loop often runs ahead and waits in `next()` while the previous step still computes: that wait
    costs nothing and is not counted. Once the previous step has finished, the whole wait counts (an
    upper bound: the step may have finished partway)."""
    waited = time.perf_counter() - before
    if previous_outputs is None:
        return waited
    return waited if all(x.is_ready() for x in jax.tree.leaves(previous_outputs)) else 0.0


def check_host_memory(config: ml_collections.ConfigDict, num_tags: int = 0) -> None:
    """Before any batch is built: the input pipeline's batches fit in this host's memory."""
    per_host = pipeline.per_host_batch_size(config.batch_size)
    spec = from_config(config)
    shapes = jax.eval_shape(lambda: example_batch(spec, per_host, config.data.max_regions, num_tags))
    guards.check_host_memory(guards.array_bytes(shapes), per_host, config.image_size)


def pretrained_weights(config: ml_collections.ConfigDict, ckpt: Checkpoints):
    """`config.init_from`'s weights (None when resuming or not asked), after the config has taken their
    architecture (resuming: the run's own checkpoint's)."""
    if not config.init_from:
        return None
    saved_spec = ckpt.newest_readable(ckpt.spec)[1]
    pretrained = weights.read(config.init_from) if saved_spec is None else None
    with config.unlocked():
        adopt_architecture(config, saved_spec or pretrained.spec, config.init_from)
    return pretrained


def initial_state(config, model, tx, mesh, ckpt: Checkpoints, spec: Spec, pretrained, data_iter) -> TrainState:
    """The newest readable checkpoint of this run of `spec`'s model (advancing `data_iter` to its position), else
    a fresh state, initialised from `pretrained` weights if given."""
    latest, state = ckpt.restore_newest(abstract_state(config, model, tx, mesh)[1], data_iter, spec)
    if latest is not None:
        print(f"Resumed from {ckpt.directory} at step {latest}")
        return state
    state, _ = init_state(config, model, tx, mesh)
    return init_from(state, pretrained, config.model.scan) if pretrained is not None else state


class Throughput:
    """Images per second and the share of wall time the devices waited for input, between log rows;
    compilation and evaluation time are not training time (`restart`)."""

    def __init__(self, step: int):
        self.restart(step)

    def restart(self, step: int | None = None) -> None:
        self.tick, self.waited = time.perf_counter(), 0.0
        if step is not None:
            self.step = step

    def row(self, done: int, batch_size: int) -> dict[str, float]:
        now, out = time.perf_counter(), {}
        if done > self.step:
            out["images_per_s"] = (done - self.step) * batch_size / (now - self.tick)
            out["data/wait_fraction"] = self.waited / (now - self.tick)
        self.tick, self.step, self.waited = now, done, 0.0
        return out


def _progress(config, first: int) -> tqdm:
    return tqdm(
        range(first, config.num_steps),
        initial=first,
        total=config.num_steps,
        desc="train",
        disable=jax.process_index() != 0,
        mininterval=1 if sys.stderr.isatty() else 60,  # a log file gets a line a minute, not a flood
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains to `config.num_steps`, resuming from `<workdir>/checkpoints` if present; returns final evals.

    SIGTERM or SIGINT: the current step finishes and is saved, and the function returns early (no evals).
    `optim.max_nonfinite_steps` skipped (non-finite) steps in a row raise `guards.RunError`."""
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    ckpt = Checkpoints(workdir, config.keep_checkpoints, config.checkpoint_every)
    pretrained = pretrained_weights(config, ckpt)
    tokenizer, model, tx = build(config)
    spec = from_config(config)  # after init_from set the architecture
    if config.eval_every and config.evals and not config.data.heldout:
        print("No evaluation during training: data.heldout is unset", flush=True)
    pipeline.check_split_set(config.data, "train")  # what to pass comes before what cannot fit
    tags = pipeline.tag_vocabulary(config, tokenizer)  # the one read of the source a step needs (UMG's tags)
    check_host_memory(config, 0 if tags is None else len(tags))
    data_stats = pipeline.DataStats()
    data_iter = pipeline.train_iterator(config, tokenizer, data_stats)  # a source that yields nothing stops here
    writer = MetricWriter(workdir)
    preemption = guards.Preemption(ckpt.manager)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
            state = initial_state(config, model, tx, mesh, ckpt, spec, pretrained, data_iter)
            encoder = Encoder(model, state.params, tokenizer, spec, config.axis_rules)
            runner = evals.runner_for(config, encoder, mesh) if config.eval_every and config.evals else None
            loop = _Loop(config, spec, model, tx, tags, ckpt, writer, preemption, data_iter, data_stats, runner)
            return loop.run(state, mesh)
    finally:
        preemption.close()
        ckpt.wait()  # a save in flight is committed whatever stopped the run
        ckpt.close()
        writer.close()


class _Loop:
    """The steps of one `train_and_evaluate` call, each part of a step its own method."""

    def __init__(self, config, spec, model, tx, tags, ckpt, writer, preemption, data_iter, data_stats, runner):
        self.config, self.spec, self.model, self.tx, self.tags = config, spec, model, tx, tags
        self.ckpt, self.writer, self.preemption, self.runner = ckpt, writer, preemption, runner
        self.data_iter, self.data_stats = data_iter, data_stats

    def run(self, state: TrainState, mesh) -> dict[str, float]:
        config, ckpt = self.config, self.ckpt
        first = int(state.step)
        progress = _progress(config, first)
        clock = Throughput(first)
        metrics, step_fn, results = None, None, {}  # metrics: the last dispatched step's outputs
        for step in progress:
            before = time.perf_counter()
            local = next(self.data_iter)
            clock.waited += input_stall(before, metrics)
            batch = sharding.global_batch(local, mesh)
            if step_fn is None:  # compiled once, checked against device memory before it runs
                step_fn = compile_step(config, self.model, self.tx, state, batch, self.tags)
            previous = metrics
            state, metrics = step_fn(state, batch)
            done = step + 1
            # The step before this one has finished or nearly: reading its count keeps dispatch ahead.
            guards.check_nonfinite(previous, done - 1, config.optim.max_nonfinite_steps, ckpt.latest_step())
            if step == first:  # compilation is not throughput
                jax.block_until_ready(metrics)
                clock.restart(done)
            if done % config.log_every == 0 or done == config.num_steps:
                self._log(done, metrics, clock, progress)
            stopping = self.preemption.requested(done)
            if config.eval_every and not stopping and (done % config.eval_every == 0 or done == config.num_steps):
                results = self._evaluate(done, state, progress)
                clock.restart()  # evaluation time is not training throughput
            saved = ckpt.save(done, state, self.data_iter, self.spec, force=done == config.num_steps)
            if stopping:
                self._stop(done, state, saved, progress)
                return results
        guards.check_nonfinite(metrics, config.num_steps, config.optim.max_nonfinite_steps, ckpt.latest_step())
        progress.close()
        return results

    def _log(self, done: int, metrics: dict, clock: Throughput, progress: tqdm) -> None:
        row = jax.device_get(metrics)
        row.update(self.data_stats.snapshot())  # repaired and skipped inputs so far (this process)
        row.update(clock.row(done, self.config.batch_size))
        self.writer.write(done, row, echo=progress.write)
        progress.set_postfix(loss=f"{row['loss']:.3f}")

    def _evaluate(self, done: int, state: TrainState, progress: tqdm) -> dict[str, float]:
        self.runner.set_params(state.params)
        results = evals.run_all(self.config, self.runner)
        self.writer.write(done, results, echo=progress.write)
        return results

    def _stop(self, done: int, state: TrainState, saved: bool, progress: tqdm) -> None:
        """A signal asked to stop: this step is saved (forced if its save was not due), then the run returns."""
        if not saved and self.ckpt.latest_step() != done:
            self.ckpt.save(done, state, self.data_iter, self.spec, force=True)
        self.ckpt.wait()
        progress.close()
        print(f"Stopped by a signal after step {done}, saved in {self.ckpt.directory}; rerun to resume")
