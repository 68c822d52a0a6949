"""Joining a multi-host job: one process per host, started the same way on every host.

- TPU pods (`gcloud compute tpus tpu-vm ssh --worker=all`): JAX discovers the pod by itself.
- SLURM (`srun`, one task per host or per GPU): JAX reads SLURM's environment.
- Anything else (GPU clusters, Kubernetes, local multi-process tests): set
  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
A single process with none of these runs alone (laptop, one GPU host, one TPU VM).
"""

import glob
import os
from collections.abc import Mapping

import jax

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def on_tpu_vm() -> bool:
    """Cloud TPU VMs expose their chips as /dev/accel* (v2-v4) or /dev/vfio/* (v5+)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def cluster_kind(env: Mapping[str, str]) -> str:
    """ "explicit", "slurm", "tpu" or "single", from the environment (before jax starts a backend)."""
    present = [k for k in EXPLICIT if env.get(k)]
    if present and len(present) != len(EXPLICIT):
        missing = sorted(set(EXPLICIT) - set(present))
        raise ValueError(f"multi-process setup needs {', '.join(EXPLICIT)}; missing {', '.join(missing)}")
    if present:
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if on_tpu_vm():
        return "tpu"
    return "single"


def initialize(env: Mapping[str, str] | None = None) -> str:
    """Calls jax.distributed.initialize when the job has several processes; returns which kind."""
    env = os.environ if env is None else env
    kind = cluster_kind(env)
    if kind == "explicit":
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif kind in ("slurm", "tpu"):
        jax.distributed.initialize()  # JAX's own cluster detection reads SLURM's / the TPU's environment
    return kind
