"""Entry point: trains a config on TPU if present, else GPU, else CPU; or compiles it for a TPU topology.

python launch/tpu.py --config=configs/cloc_tiny.py --workdir=/tmp/cloc_tiny
python launch/tpu.py --config=configs/cloc_b16.py:batch_size=4096 --config.optim.name=adamw --workdir=gs://...
python launch/tpu.py --config=configs/cloc_l14.py --aot_topology=v5p:8x8x16   # no TPU needed
"""

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cloc_jax import cpu, distributed, gpu
from cloc_jax.data import pipeline
from cloc_jax.guards import RunError
from cloc_jax.train import aot, dense, train_and_evaluate

cpu.order_collectives()  # before JAX makes its backends (imported above, started at the first computation)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file, optionally FILE:key=value,...", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go; reused to resume")
_AOT_TOPOLOGY = flags.DEFINE_string(
    "aot_topology", None, "compile the training step for this TPU topology (e.g. v5p:8x8x16) and report; no training"
)
_GPU_PRESETS = flags.DEFINE_bool(
    "gpu_presets", True, "on an NVIDIA GPU host, add cloc_jax.gpu.PRESET's XLA flags (those jaxlib knows)"
)
_AOT_ESTIMATE = flags.DEFINE_bool(
    "aot_estimate", False, "also XLA's cost-model step time (compiles the step again, unrolled at shallow depths)"
)


def describe_platform() -> str:
    """Which accelerator JAX picked; JAX's own default order is TPU, then GPU, then CPU."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    count = f"{len(devices)} device(s) ({', '.join(kinds)}), {jax.process_count()} process(es)"
    return f"{devices[0].platform.upper()}: {count}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if not os.environ.get("JAX_PLATFORMS") and not distributed.on_tpu_vm():
        jax.config.update("jax_platforms", "cuda,cpu")  # no TPU here: GPU if any, else CPU; libtpu stays quiet
    if _GPU_PRESETS.value and not _AOT_TOPOLOGY.value and gpu.on_gpu_host(os.environ):
        for line in gpu.apply_presets():  # before the first computation, which reads XLA_FLAGS
            print(line, flush=True)
    config = _CONFIG.value
    if _AOT_TOPOLOGY.value:
        devices = aot.topology_devices(_AOT_TOPOLOGY.value, config.mesh.slices)  # --config.mesh.slices=N: N slices
        tags = pipeline.tag_vocabulary(config)  # UMG's tag vocabulary, read from the data (None otherwise)
        report = aot.compile_for(config, devices, estimate=_AOT_ESTIMATE.value, tags=tags)
        print(aot.format_report(f"{_AOT_TOPOLOGY.value} x {config.mesh.slices} slice(s)", report), flush=True)
        print(json.dumps(report), flush=True)
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required for training")
    kind = distributed.initialize()
    if jax.default_backend() == "cpu":
        cpu.keep_freed_memory()  # XLA:CPU's step buffers reuse freed pages instead of faulting in new ones
    print(f"Running on {describe_platform()} [{kind}]", flush=True)
    run = dense.adapt if "dense" in config else train_and_evaluate  # dense adaptation, or pretraining
    results = run(config, _WORKDIR.value)
    print(json.dumps(results), flush=True)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but an unknown `--config.key` is one line instead of a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        while e.args and isinstance(e.args[0], Exception):  # ml_collections wraps a KeyError
            e = e.args[0]
        key, _, hint = str(e.args[0] if e.args else e).partition("\n")
        key = key.strip("\"'")
        bad = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0]), key)
        sys.exit(f"error: {bad}: no such config key. {hint}".strip())


def run():
    try:
        app.run(main, flags_parser=parse_flags)
    except (ValueError, FileNotFoundError, KeyError, RunError) as e:  # config, input, run errors: one line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
