"""Helpers shared by the benchmarks (no flags here: each benchmark script defines its own)."""

import ast
import contextlib
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax import cpu, sharding
from cloc_jax.config import set_dotted
from cloc_jax.data import pipeline
from cloc_jax.train import aot, build, init_state, make_train_step

# The fast layout on a CPU (layout keys: what a config trains is unchanged). The paper configs are laid out
# for TPUs, where bf16, remat and scanned layers pay; on a CPU each costs time.
CPU_LAYOUT = {"dtype": "float32", "remat": "none", "scan": False}

if jax.default_backend() == "cpu":
    cpu.keep_freed_memory()  # as the launcher does on a CPU: step buffers reuse freed pages


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(n: int = 4096, repeats: int = 5, dtype=jnp.float32) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    return 2 * n**3 / median_seconds(lambda: mm(a), repeats)


def apply_overrides(config, items: list[str]):
    """["model.remat=full", "model.scan=false", ...] -> those keys set, each text read as the type the key holds
    (bools from 1/true/yes, other scalars by their type, tuples and lists as Python literals)."""
    for key, _, text in (item.partition("=") for item in items):
        old = functools.reduce(lambda c, k: c[k], key.split("."), config)
        if isinstance(old, bool):
            value = text.lower() in ("1", "true", "yes")
        else:
            value = type(old)(text) if isinstance(old, int | float | str) else ast.literal_eval(text)
        set_dotted(config, {key: value})
    return config


def step_flops(config) -> float:
    """FLOPs of one step from XLA's cost analysis, compiled with layers unrolled (a scanned stack is
    counted once) for this machine's devices."""
    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan = False
    unrolled.model.remat = "none"
    return float(aot.compile_on(unrolled, jax.devices(), pipeline.tag_vocabulary(unrolled))[0].cost_analysis()["flops"])


def sized_and_meshed(config, batch: int, cpu_layout: bool):
    """(config, mesh): the config at this global batch, in CPU_LAYOUT when `cpu_layout` and JAX runs on a CPU,
    and its mesh, the batch checked against it (one line if the mesh does not divide it)."""
    config.batch_size = batch
    if cpu_layout and jax.default_backend() == "cpu":
        config.model.update(CPU_LAYOUT)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    return config, mesh


def real_batch(config, mesh) -> dict:
    """One batch from the real input pipeline, as global arrays."""
    tokenizer, _, _ = build(config)
    local = next(pipeline.train_iterator(config, tokenizer))
    return sharding.global_batch(local, mesh)


def step_runner(config, batch, mesh):
    """A compiled, warmed-up training step as a no-argument callable returning its metrics: the same batch
    each call, the state carried from call to call and donated, as training runs it. Every call runs under
    the mesh and axis rules it was compiled under (they are part of jit's cache key: outside them the first
    timed call would compile another program). `.compiled()` gives the executable it runs."""
    _, model, tx = build(config)

    @contextlib.contextmanager
    def under_mesh():
        with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
            yield

    with under_mesh():
        state, _ = init_state(config, model, tx, mesh)
        step = jax.jit(make_train_step(config, model, tx, pipeline.tag_vocabulary(config)), donate_argnums=0)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    holder = [state]

    def run():
        with under_mesh():
            holder[0], metrics = step(holder[0], batch)
        return metrics

    def compiled():
        with under_mesh():
            return step.lower(holder[0], batch).compile()

    run.compiled = compiled
    return run
