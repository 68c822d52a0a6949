"""Times the full training step and reports MFU against a matmul measured in the same process.

    python bench/step.py --config=configs/cloc_b16.py --batch=16

Prints one JSON line: images_per_s, flops_per_step (XLA cost analysis of the *unrolled* step, because
a scanned layer stack is counted once), achieved_flops_per_s, peak_flops_per_s (a 4096^2 f32 matmul)
and mfu. Rematerialised recomputation is not counted as useful work.
"""

import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from cloc_jax import sharding
from cloc_jax.data import pipeline
from cloc_jax.train import abstract_state, build, init_state, make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 16, "global batch size")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps (after one warm-up)")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(n: int = 4096, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    return 2 * n**3 / median_seconds(lambda: mm(a), repeats)


def step_flops(config, batch) -> float:
    """FLOPs of one step from XLA's cost analysis, compiled with layers unrolled."""
    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan = False
    unrolled.model.remat = "none"
    mesh = sharding.make_mesh(unrolled.mesh)
    _, model, tx = build(unrolled)
    with jax.set_mesh(mesh), nn.logical_axis_rules(unrolled.axis_rules):
        _, shapes = abstract_state(unrolled, model, tx, mesh)
        compiled = jax.jit(make_train_step(unrolled, model, tx)).lower(shapes, batch).compile()
    return float(compiled.cost_analysis()["flops"])


def real_batch(config, mesh) -> dict:
    """One batch from the real input pipeline, as global arrays."""
    tokenizer, _, _ = build(config)
    local = next(pipeline.train_iterator(config, tokenizer))
    local.pop("dropped_boxes")
    return sharding.global_batch(local, mesh)


def step_runner(config, batch, mesh):
    """A compiled, warmed-up training step as a no-argument callable (same state and batch each call)."""
    _, model, tx = build(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        state, _ = init_state(config, model, tx, mesh)
        step = jax.jit(make_train_step(config, model, tx))
        jax.block_until_ready(step(state, batch))
    return lambda: step(state, batch)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    config.batch_size = _BATCH.value
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    batch = real_batch(config, mesh)
    seconds = median_seconds(step_runner(config, batch, mesh), _STEPS.value)
    flops = step_flops(config, batch)
    peak = matmul_peak_flops()
    achieved = flops / seconds
    print(
        json.dumps(
            dict(
                config=config.model.image.variant,
                batch=config.batch_size,
                devices=len(jax.devices()),
                seconds_per_step=seconds,
                images_per_s=config.batch_size / seconds,
                flops_per_step=flops,
                achieved_flops_per_s=achieved,
                peak_flops_per_s=peak,
                mfu=achieved / peak,
            )
        )
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
