"""Times the full training step and reports MFU against a matmul measured in the same process.

    python bench/step.py --config=configs/cloc_b16.py:data=scenes --batch=16

On a CPU the step runs in the fast CPU layout unless `--nocpu_layout`: float32, no remat, layers unrolled
(the paper configs are laid out for TPUs, where bf16, remat and scanned layers pay; here each costs time).
These are layout keys: what the config trains is unchanged.

Prints one JSON line: images_per_s, flops_per_step (XLA cost analysis of the *unrolled* step, because
a scanned layer stack is counted once), achieved_flops_per_s, peak_flops_per_s (a 4096^2 f32 matmul)
and mfu. Rematerialised recomputation is not counted as useful work.
"""

import json

import jax
from absl import app, flags, logging
from common import (
    CPU_LAYOUT,
    matmul_peak_flops,
    median_seconds,
    real_batch,
    sized_and_meshed,
    step_flops,
    step_runner,
)
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 16, "global batch size")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps (after one warm-up)")
_CPU_LAYOUT = flags.DEFINE_bool("cpu_layout", True, "on a CPU: float32, no remat, layers unrolled")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config, mesh = sized_and_meshed(_CONFIG.value, _BATCH.value, _CPU_LAYOUT.value)
    batch = real_batch(config, mesh)
    seconds = median_seconds(step_runner(config, batch, mesh), _STEPS.value)
    flops = step_flops(config)
    peak = matmul_peak_flops()
    achieved = flops / seconds
    print(
        json.dumps(
            dict(
                config=config.model.image.variant,
                layout={k: config.model[k] for k in CPU_LAYOUT},
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
