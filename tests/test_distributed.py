"""Multi-host: how a process finds its job (a real two-process run, stopped by SIGTERM and resumed, is in
test_faults.py)."""

import pytest

from cloc_jax import distributed


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
