"""End to end: bad input is one line, a non-finite step changes nothing (a run that learns:
test_trained_tiny.py; faults with real signals and processes: test_faults.py)."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cloc_jax.train import train_and_evaluate
from tests.conftest import ROOT, tiny_config


def metric_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_batch_not_divisible_by_data_parallel_devices_fails_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by 8 data-parallel devices"):
        train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))


LAUNCH = [
    sys.executable,
    os.path.join(ROOT, "launch", "tpu.py"),
    "--config=" + os.path.join(ROOT, "configs", "cloc_tiny.py"),
]
TINY = [
    "--config.image_size=32",
    "--config.batch_size=16",
    "--config.num_steps=30",
    "--config.tokenizer.context_length=24",
    "--config.tokenizer.region_context_length=24",
    "--config.data.heldout_size=32",
    "--config.eval_every=0",
    "--config.log_every=5",
    "--config.checkpoint_every=5",
    "--config.keep_checkpoints=10",
]


def launch(workdir, *extra, **kwargs):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.Popen([*LAUNCH, *TINY, *extra, f"--workdir={workdir}"], env=env, text=True, **kwargs)


def test_unknown_config_key_is_one_line(tmp_path):
    out = subprocess.run([*LAUNCH, "--config.optim.nme=adamw", f"--workdir={tmp_path}"], capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        'error: --config.optim.nme: no such config key. Did you mean "name" instead of "nme"?'
    )


def test_a_nan_box_does_not_poison_the_step_and_a_nan_loss_changes_nothing():
    import flax.linen as nn

    from cloc_jax import sharding
    from cloc_jax.models.build import example_batch
    from cloc_jax.models.spec import from_config
    from cloc_jax.train import build, init_state, make_train_step

    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    _, model, tx = build(config)
    batch = example_batch(from_config(config), 16, config.data.max_regions)
    batch["image"] = jax.random.normal(jax.random.key(0), batch["image"].shape)
    words = jax.random.randint(jax.random.key(1), (16, 4), 2, 20)  # ids inside cloc_tiny's word vocabulary
    batch["tokens"] = batch["tokens"].at[:, :4].set(words)
    batch["region_tokens"] = batch["region_tokens"].at[:, :, :3].set(5)
    batch["region_mask"] = batch["region_mask"].at[:, 0].set(True)
    batch["boxes"] = batch["boxes"].at[:, 0].set(jax.numpy.array([0.1, 0.1, 0.6, 0.7])).at[3, 0, 0].set(np.nan)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        state, _ = init_state(config, model, tx, mesh)
        step = jax.jit(make_train_step(config, model, tx))
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        assert all(np.isfinite(float(v)) for v in metrics.values())
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
        # A step whose loss is NaN (here: NaN pixels) changes neither the parameters nor the optimizer state,
        # and is counted; the next finite step trains again.
        before = jax.device_get((state.params, state.opt_state))
        poisoned = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(np.nan))
        state, metrics = step(state, sharding.global_batch(poisoned, mesh))
        assert not np.isfinite(float(metrics["loss"]))
        assert int(metrics["nonfinite/in_a_row"]) == int(metrics["nonfinite/skipped_steps"]) == 1
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((state.params, state.opt_state)))):
            np.testing.assert_array_equal(x, y)
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        assert int(metrics["nonfinite/in_a_row"]) == 0 and int(metrics["nonfinite/skipped_steps"]) == 1
        assert int(state.step) == 3


def test_roi_align_extractor_trains_and_evaluates_without_a_grounding_head(tmp_path):
    config = tiny_config(num_steps=4, eval_every=4, **{"model.region_extractor": "roi_align"})
    with config.unlocked():  # the evaluators this test is about: regions, and grounding (which RoIAlign cannot do)
        config.evals = {name: config.evals[name] for name in ("region", "region_retrieval", "grounding")}
    results = train_and_evaluate(config, str(tmp_path))
    assert "region/macc" in results and "region/r2t_r1" in results and "grounding/acc50" not in results
    row = next(r for r in metric_rows(str(tmp_path)) if "loss" in r)
    assert np.isfinite(row["loss/region"]) and "loss/grounding" not in row


class _Step:
    """A dispatched step's output that is or is not finished yet."""

    def __init__(self, ready: bool):
        self.ready = ready

    def is_ready(self) -> bool:
        return self.ready


def test_input_stall_counts_waiting_only_once_the_devices_are_idle():
    from cloc_jax.train import input_stall

    before = time.perf_counter() - 0.25  # next() took 0.25 s
    assert input_stall(before, None) >= 0.25  # the first step: nothing was computing
    assert input_stall(before, {"loss": _Step(True), "lr": _Step(True)}) >= 0.25  # devices sat idle
    assert input_stall(before, {"loss": _Step(True), "lr": _Step(False)}) == 0.0  # still computing: no stall
    assert input_stall(before, {"loss": jax.numpy.ones(2) * 2}) >= 0.25  # a real, finished jax.Array
