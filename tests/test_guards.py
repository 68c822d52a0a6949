"""The guards that end a run early: their one-line messages and the pre-emption flag."""

import os
import signal
import types

import pytest

from cloc_jax import guards
from cloc_jax.checkpoint import Checkpoints
from cloc_jax.config import load_config_file
from cloc_jax.train import check_host_memory
from tests.conftest import ROOT


def test_batches_that_cannot_fit_in_host_memory_are_one_line_with_the_figures():
    config = load_config_file(os.path.join(ROOT, "configs", "cloc_l14.py"), "data=scenes")
    with pytest.raises(guards.RunError) as error:
        check_host_memory(config)  # 32,768 images at 336 px: 44 GiB a batch
    message = str(error.value)
    assert "\n" not in message and "batches of 32768 images at 336 px, 41.4 GiB each" in message
    assert "lower --config.batch_size" in message


def _compiled(argument: int, output: int, temp: int, alias: int):
    analysis = types.SimpleNamespace(
        argument_size_in_bytes=argument, output_size_in_bytes=output, temp_size_in_bytes=temp, alias_size_in_bytes=alias
    )
    return types.SimpleNamespace(memory_analysis=lambda: analysis)


def test_a_step_over_device_memory_is_one_line_and_donation_is_counted_once(monkeypatch):
    device = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": 16 * guards.GiB}, device_kind="TPU v5p")
    gib = guards.GiB
    guards.check_step_memory(_compiled(10 * gib, 10 * gib, 5 * gib, 10 * gib), device)  # 15 GiB: donated state
    over = r"needs 17\.0 GiB per device .* a device has 16\.0 GiB \(TPU v5p memory\)"
    with pytest.raises(guards.RunError, match=over):
        guards.check_step_memory(_compiled(10 * gib, 10 * gib, 7 * gib, 10 * gib), device)
    cpu = types.SimpleNamespace(memory_stats=lambda: None, device_kind="cpu")
    _, what, resident = guards.device_memory_limit(cpu)
    assert "available host memory" in what and resident  # on the host, the state is already allocated
    monkeypatch.setattr(guards, "device_memory_limit", lambda device: (16 * gib, "host", True))
    guards.check_step_memory(_compiled(30 * gib, 10 * gib, 7 * gib, 10 * gib), cpu)  # 7 GiB more: fits


def test_sigterm_sets_the_stop_flag_and_the_old_handler_comes_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    preemption = guards.Preemption(Checkpoints(str(tmp_path)).manager)
    assert not preemption.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes: the process lives on
    assert preemption.requested(1) and preemption.signal == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):  # asked twice: stop at once
        os.kill(os.getpid(), signal.SIGINT)
    preemption.close()
    assert signal.getsignal(signal.SIGTERM) is before
