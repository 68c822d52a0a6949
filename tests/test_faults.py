"""Fault injection with real processes and real signals: pre-emption, SIGKILL, a diverging run, data that
yields nothing, a run that cannot fit. Every test here launches `launch/tpu.py` (marked `faults`)."""

import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import time

import numpy as np
import pytest

from cloc_jax import weights
from cloc_jax.checkpoint import Checkpoints
from cloc_jax.weights.native import export
from tests.conftest import ROOT
from tests.test_train import LAUNCH, TINY, launch, metric_rows

pytestmark = pytest.mark.faults


def _wait_for_checkpoint(proc, workdir: str, at_least: int, timeout: float = 300) -> None:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if steps and max(map(int, steps)) >= at_least:
            return
        time.sleep(0.05)
    out = proc.communicate()[0] if proc.poll() is not None and proc.stdout else ""
    raise AssertionError(f"no checkpoint >= {at_least} in {workdir} (exit code {proc.poll()}): {(out or '')[-3000:]}")


def _final_params(workdir: str, step: int) -> dict[str, np.ndarray]:
    """The parameters of checkpoint `step`, read on one device whatever mesh and processes saved them."""
    return weights.read(export(workdir, os.path.join(workdir, f"export_{step}"), step=step)).params


def _stopped_step(out: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith("Stopped by a signal after step"))
    return int(line.split("after step ")[1].split(",")[0])


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGTERM: the step finishes, is saved, exit 0. SIGKILL later (any moment, even mid-save). The twice
    interrupted run ends with the parameters and data position of a run never interrupted."""
    interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    proc = launch(interrupted, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_checkpoint(proc, interrupted, 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = _stopped_step(out)
    assert 5 <= stopped < 30 and Checkpoints(interrupted).latest_step() == stopped  # no step lost

    proc = launch(interrupted, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_checkpoint(proc, interrupted, stopped + 5)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert f"at step {stopped}" in out  # the restart continued where SIGTERM stopped
    killed_at = Checkpoints(interrupted).latest_step()
    assert stopped < killed_at < 30

    resumed = launch(interrupted, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"at step {killed_at}" in out
    assert launch(straight, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=600) == 0

    for workdir in (interrupted, straight):  # 30 steps consumed exactly 30 batches of 16 records: none repeated
        with open(os.path.join(workdir, "checkpoints", "30", "data", "process_0-of-1.json")) as f:
            assert json.load(f) == {"next_index": 30 * 16}
    a, b = _final_params(interrupted, 30), _final_params(straight, 30)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:  # same ops, same data, same device count: equal up to float noise
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)
    steps = [row["step"] for row in metric_rows(interrupted)]  # log rows continue without a gap
    assert steps[-1] == 30 and set(range(5, 31, 5)) <= set(steps)


def _two_processes(workdir: str, port: int, *extra: str) -> list[subprocess.Popen]:
    procs = []
    # No shared compilation cache: a process that finds the step cached runs ahead of one that compiles it,
    # and Gloo's 30 s rendezvous times out (seen under a loaded test run).
    clean = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    for pid in range(2):
        env = {
            **clean,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        cmd = [*LAUNCH, *TINY, *extra, f"--workdir={workdir}"]
        procs.append(subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def _outputs(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Every process's output; on a timeout all are killed (they ignore SIGTERM: it means save and stop)."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_stop_together_on_sigterm_and_resume(tmp_path):
    """jax.distributed with two processes: only process 0 logs, every host saves its data position; SIGTERM
    to both stops both at the same step (JAX's pre-emption sync point) with exit 0, and the restart ends
    where an uninterrupted two-process run ends."""
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    # (evaluation over both hosts' shares: tests/test_evaluate.py::test_two_processes_give_the_one_process_metrics)
    procs = _two_processes(straight, _free_port(), "--config.num_steps=10")
    outs = _outputs(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "4 device(s) (cpu), 2 process(es)" in outs[0]
    rows = metric_rows(straight)
    assert [row["step"] for row in rows if "loss" in row] == [5, 10]  # one writer: no duplicated rows
    for pid in range(2):  # every host saved its own position: 10 steps of its 8 records (global batch 16)
        with open(os.path.join(straight, "checkpoints", "10", "data", f"process_{pid}-of-2.json")) as f:
            assert json.load(f) == {"next_index": 10 * 8}

    procs = _two_processes(interrupted, _free_port(), "--config.num_steps=10", "--config.checkpoint_every=2")
    _wait_for_checkpoint(procs[0], interrupted, 2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = _outputs(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    stopped = _stopped_step(outs[0])
    assert stopped == _stopped_step(outs[1]) < 10  # both hosts agreed on the step
    assert Checkpoints(interrupted).latest_step() == stopped
    procs = _two_processes(interrupted, _free_port(), "--config.num_steps=10", "--config.checkpoint_every=2")
    outs = _outputs(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert f"at step {stopped}" in outs[0]
    a, b = _final_params(interrupted, 10), _final_params(straight, 10)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_an_lr_spike_stops_the_run_in_one_line_and_every_checkpoint_stays_finite(tmp_path):
    workdir = str(tmp_path)
    args = ["--config.optim.lr=1e6", "--config.optim.max_nonfinite_steps=3", "--config.checkpoint_every=2"]
    out = subprocess.run([*LAUNCH, *TINY, *args, f"--workdir={workdir}"], capture_output=True, text=True)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "3 steps in a row had a non-finite loss" in last, last
    rows = [r for r in metric_rows(workdir) if "loss" in r]
    assert any(not np.isfinite(r["loss"]) for r in rows) and rows[-1]["nonfinite/skipped_steps"] >= 1
    ckpt = Checkpoints(workdir)
    assert ckpt.manager.all_steps()
    for step in ckpt.manager.all_steps():
        assert all(np.isfinite(p).all() for p in _final_params(workdir, step).values()), step


def _tar_with_unusable_samples(directory: str) -> str:
    os.makedirs(directory)
    with tarfile.open(os.path.join(directory, "bad.tar"), "w") as tar:
        for i in range(40):
            for ext, payload in (("png", b"not a png"), ("json", b'{"caption": "a red circle"}')):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return f"webdataset:{directory}/bad.tar"


def _empty_tar(directory: str) -> str:
    os.makedirs(directory)
    tarfile.open(os.path.join(directory, "empty.tar"), "w").close()
    return f"webdataset:{directory}/empty.tar"


def _zero_byte_tar(directory: str) -> str:
    os.makedirs(directory)
    open(os.path.join(directory, "zero.tar"), "wb").close()
    return f"webdataset:{directory}/zero.tar"


@pytest.mark.parametrize(
    "make, says",
    [
        (_empty_tar, "holds 0 records"),
        (_zero_byte_tar, "holds 0 records"),
        (_tar_with_unusable_samples, "none of its first 40 records is usable (skipped/corrupt_image: 40)"),
    ],
)
def test_data_that_yields_nothing_is_one_line_within_seconds(tmp_path, make, says):
    spec = make(str(tmp_path / "data"))
    start = time.time()
    args = [f"--config.data.train={spec}", f"--workdir={tmp_path / 'run'}"]
    out = subprocess.run([*LAUNCH, *TINY, *args], capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data source {spec!r}") and says in last, last
    assert "Traceback" not in out.stderr
    assert elapsed < 30, elapsed


def test_the_paper_config_on_this_machine_stops_with_the_memory_line(tmp_path):
    """cloc_l14 at its paper batch (32,768 at 336 px) on a CPU: one line with the figures, no OOM kill."""
    cmd = [*LAUNCH[:2], "--config=" + os.path.join(ROOT, "configs", "cloc_l14.py") + ":data=scenes"]
    start = time.time()
    out = subprocess.run([*cmd, f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the input pipeline needs about") and "lower --config.batch_size" in last, last
    assert "batches of 32768 images at 336 px" in last
    assert time.time() - start < 120


def test_a_run_saved_on_8_devices_resumes_on_4_with_another_remat_past_a_damaged_checkpoint(tmp_path):
    """Mesh, device count and remat are layout, not identity: the 8-device (8, 1, 1) run of this process
    resumes in a 4-device (2, 2, 1) process with full remat, passing over its garbled newest checkpoint."""
    from cloc_jax.train import train_and_evaluate
    from tests.conftest import tiny_config

    workdir = str(tmp_path)
    train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=2), workdir)  # 8 devices: data=8
    state = os.path.join(workdir, "checkpoints", "4", "state")
    largest = max((os.path.join(d, f) for d, _, names in os.walk(state) for f in names), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    args = ["--config.num_steps=6", "--config.mesh.fsdp=2", "--config.model.remat=full", "--config.checkpoint_every=2"]
    out = subprocess.run([*LAUNCH, *TINY, *args, f"--workdir={workdir}"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    warning = next(x for x in out.stdout.splitlines() if x.startswith("warning: checkpoint"))
    assert os.path.join(workdir, "checkpoints", "4") in warning
    assert f"Resumed from {os.path.join(workdir, 'checkpoints')} at step 2" in out.stdout
    assert "4 device(s)" in out.stdout and Checkpoints(workdir).latest_step() == 6
    assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "4"))
