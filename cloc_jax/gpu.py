"""XLA settings for NVIDIA GPU hosts, applied by the launcher before JAX starts its backends.

What a contrastive ViT step needs from XLA on GPUs is what MaxText's and NVIDIA JAX-Toolbox's GPU recipes set
for their FSDP runs (github.com/NVIDIA/JAX-Toolbox rosetta/docs/GPU_performance.md): the latency-hiding
scheduler, so all-gathers and reduce-scatters overlap the matmuls; pipelined collectives and double-buffered
while loops, so a scanned layer's weights are gathered while the previous layer computes; combine thresholds,
so many small gradient reductions become few large NCCL calls; and XLA's own rematerialisation pass off
(`model.remat` decides what is recomputed). The bf16 activations, float32 parameters and cuDNN flash attention
come with the configs (`model.dtype`, `model.attention=auto`).

XLA flags come and go between releases (`xla_gpu_enable_triton_softmax_fusion` and `xla_gpu_graph_level` were
removed), and an unknown flag aborts the process at its first compile. `accepted` asks the installed jaxlib
which flags it knows by starting one short process; the rest are dropped and reported.
"""

import glob
import os
import re
import subprocess
import sys
from collections.abc import Mapping

# flag -> value. Combine thresholds as in MaxText's 8-GPU recipes: all-reduces up to 1 GiB, all-gathers up to
# 1 GiB / 8, reduce-scatters up to 1 GiB / 16 (a combined buffer is gathered into every GPU of a node).
PRESET = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": str(1 << 30),
    "xla_gpu_all_gather_combine_threshold_bytes": str(1 << 27),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(1 << 26),
    "xla_gpu_enable_all_gather_combine_by_dim": "false",
    "xla_gpu_enable_reduce_scatter_combine_by_dim": "false",
    "xla_disable_hlo_passes": "rematerialization",
}
# JAX preallocates this share of GPU memory (its default 0.75 leaves a quarter of an 80 GiB part idle); the
# rest is for cuDNN workspaces and NCCL buffers.
MEMORY_FRACTION = "0.9"
_PROBE = "import jax; jax.jit(lambda x: x + 1, backend='cpu')(1)"  # the first compile parses XLA_FLAGS


def on_gpu_host(env: Mapping[str, str]) -> bool:
    """An NVIDIA device node, not hidden by CUDA_VISIBLE_DEVICES, and JAX allowed to use CUDA."""
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def flag_names(flags: str) -> set[str]:
    """'--a=1 --b' -> {'a', 'b'}."""
    return {item.lstrip("-").split("=")[0] for item in flags.split()}


def accepted(flags: dict[str, str], env: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """-> (the flags the installed jaxlib knows, the names it does not), by compiling in a child process with
    them set (XLA names every unknown flag in one line before it aborts)."""
    env = dict(os.environ if env is None else env)
    known, unknown = dict(flags), []
    for _ in range(2):  # the first answer names every unknown flag; the second confirms the rest
        line = " ".join(f"--{k}={v}" for k, v in known.items())
        child = {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {line}", "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", _PROBE], env=child, capture_output=True, text=True)
        found = re.search(r"Unknown flags? in XLA_FLAGS: (.*)", out.stderr)
        if out.returncode == 0:
            return known, unknown
        if not found:
            raise ValueError(f"probing XLA flags failed: {out.stderr.strip().splitlines()[-1:]}")
        bad = flag_names(found.group(1)) & set(known)
        if not bad:
            raise ValueError(f"XLA_FLAGS has flags this jaxlib does not know: {found.group(1)}")
        unknown += sorted(bad)
        known = {k: v for k, v in known.items() if k not in bad}
    raise ValueError(f"probing XLA flags failed twice: {out.stderr.strip().splitlines()[-1:]}")


def apply_presets(env: dict[str, str] | None = None) -> list[str]:
    """Adds PRESET (what this jaxlib accepts, and what XLA_FLAGS does not already set: the user's value wins)
    and the memory fraction to `env` (os.environ). Returns one line per setting added or dropped, to print."""
    env = os.environ if env is None else env
    mine = flag_names(env.get("XLA_FLAGS", ""))
    wanted = {k: v for k, v in PRESET.items() if k not in mine}
    known, unknown = accepted(wanted, env)
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *(f"--{k}={v}" for k, v in known.items())]).strip()
    lines = [f"GPU preset: {len(known)} XLA flags added, {len(mine & set(PRESET))} kept as XLA_FLAGS set them"]
    lines += [f"GPU preset: --{name} dropped, this jaxlib does not know it" for name in unknown]
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = MEMORY_FRACTION
        lines.append(f"GPU preset: XLA_PYTHON_CLIENT_MEM_FRACTION={MEMORY_FRACTION}")
    return lines
