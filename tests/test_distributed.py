"""Multi-host: how a process finds its job, and a real two-process run on CPU."""

import json
import os
import socket
import subprocess

import pytest

from cloc_jax import distributed
from tests.test_train import LAUNCH, TINY


def test_explicit_environment_initializes_with_its_values(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.initialize(env) == "explicit"
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)]


def test_slurm_with_several_tasks_lets_jax_read_slurm(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.initialize({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "slurm"
    assert calls == [{}]
    monkeypatch.setattr(distributed, "on_tpu_vm", lambda: False)
    assert distributed.initialize({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) == "single"
    assert distributed.initialize({}) == "single"
    assert len(calls) == 1  # a single process never starts the distributed runtime


def test_partial_explicit_environment_is_one_line():
    with pytest.raises(ValueError, match="missing JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        distributed.cluster_kind({"JAX_COORDINATOR_ADDRESS": "host:1"})


@pytest.mark.slow
def test_two_processes_train_together_and_only_process_0_logs(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path)
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        cmd = [*LAUNCH, *TINY, "--config.num_steps=10", f"--workdir={workdir}"]
        procs.append(subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "4 device(s) (cpu), 2 process(es)" in outs[0]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [5, 10]  # one writer: no duplicated rows
    data = os.path.join(workdir, "checkpoints", "10", "data")
    for pid in range(2):  # every host saved its own position: 10 steps of its 8 records (global batch 16)
        with open(os.path.join(data, f"process_{pid}-of-2.json")) as f:
            assert json.load(f) == {"next_index": 10 * 8}
