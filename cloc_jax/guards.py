"""What ends a run early, and how: pre-emption signals, non-finite steps, and a run that cannot fit.

Each ends with one line that says what happened and what to do, never an OOM kill, a hang or a run
that goes on training on NaNs. The training loop (train.py) is their only user.
"""

import os
import signal
import threading

import jax
import numpy as np
import psutil

GiB = 2**30


class RunError(RuntimeError):
    """A run that must stop; the launcher prints the message as one line and exits non-zero."""


class Preemption:
    """SIGTERM (TPU maintenance, pre-emptible VMs, SLURM, Kubernetes) and SIGINT ask the loop to finish its
    step, save, and exit 0.

    One process: a signal handler sets a flag the loop reads after each step. Several processes: JAX's
    pre-emption service (started by `jax.distributed.initialize`) owns SIGTERM and makes every host agree
    on the step to stop at (`reached_preemption_sync_point`, which Orbax's `save` already consults);
    SIGINT is turned into SIGTERM so it takes the same path. A second signal interrupts at once."""

    def __init__(self, manager):
        self.manager, self.signal, self._previous = manager, None, {}
        self.multi_process = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a notebook's worker)
        handled = (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT)
        for sig in handled:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signal = signum
        if self.multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler, which tells the other hosts

    def requested(self, step: int) -> bool:
        """True once the run should stop after `step` (on every host at the same step)."""
        if self.multi_process:
            return self.manager.reached_preemption(step)
        return self.signal is not None

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def check_nonfinite(metrics: dict | None, step: int, limit: int, checkpoint: int | None) -> None:
    """Stops the run once `limit` steps in a row were skipped for a non-finite loss, gradient or update
    (`metrics` of step `step`, which the train step counts; reading it waits for that step)."""
    if metrics is None or limit <= 0:
        return
    in_a_row = int(jax.device_get(metrics["nonfinite/in_a_row"]))
    if in_a_row >= limit:
        where = f"step {checkpoint}" if checkpoint is not None else "none yet"
        raise RunError(
            f"step {step}: {in_a_row} steps in a row had a non-finite loss, gradient or update and were skipped "
            f"(optim.max_nonfinite_steps={limit}); the parameters kept their last finite values (newest "
            f"checkpoint: {where}). Lower --config.optim.lr or check the data, then rerun to resume"
        )


def array_bytes(tree) -> int:
    """Bytes of a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# The input pipeline holds about this many batches at once: two prefetched, the one being fed to the
# devices, the one being assembled, and the global array built from the local one.
BATCHES_IN_HOST_MEMORY = 5


def check_host_memory(batch_bytes: int, per_host_batch: int, image_size: int) -> None:
    """One line, before any batch is built, when the input pipeline's batches cannot fit in host memory."""
    need, have = BATCHES_IN_HOST_MEMORY * batch_bytes, psutil.virtual_memory().available
    if need > have:
        raise RunError(
            f"the input pipeline needs about {need / GiB:.1f} GiB of host memory ({BATCHES_IN_HOST_MEMORY} "
            f"batches of {per_host_batch} images at {image_size} px, {batch_bytes / GiB:.1f} GiB each) and "
            f"{have / GiB:.1f} GiB are available: lower --config.batch_size, or run on more hosts"
        )


def device_memory_limit(device) -> tuple[int, str, bool]:
    """(bytes one device can hold, what that figure is, whether the arguments already live in it). CPU
    devices share the host's memory, whose available figure already leaves out the resident state."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory", False
    local = max(1, jax.local_device_count())
    return psutil.virtual_memory().available // local, f"available host memory / {local} local device(s)", True


def check_step_memory(compiled, device) -> None:
    """One line when the compiled step needs more memory per device than the device has (XLA's memory
    analysis: arguments, unless already resident in host memory, + outputs + temporaries, less what
    donation aliases)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return
    have, what, resident = device_memory_limit(device)
    arguments = 0 if resident else analysis.argument_size_in_bytes
    need = arguments + analysis.output_size_in_bytes + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes
    if need > have:
        raise RunError(
            f"the training step needs {need / GiB:.1f} GiB per device (XLA's memory analysis: "
            f"{analysis.temp_size_in_bytes / GiB:.1f} GiB temporaries) and a device has {have / GiB:.1f} GiB "
            f"({what}): lower --config.batch_size, set --config.model.remat=full, or shard more "
            "(--config.mesh: more fsdp or tensor parallelism, more devices)"
        )
