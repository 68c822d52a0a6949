"""Compile time of the training step with the layers scanned vs unrolled, on this machine's devices.

    python bench/compile.py --config=configs/cloc_l14.py:data=scenes --batch=8

`nn.scan` compiles one layer body whatever the depth; unrolling compiles every layer. Prints one
JSON line with both times and their ratio (measured in one run).
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cloc_jax.train import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 8, "global batch size")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    seconds = {}
    for scan in (True, False):
        config = _CONFIG.value.copy_and_resolve_references()
        config.batch_size = _BATCH.value
        config.model.scan = scan
        seconds[scan] = aot.compile_for(config, jax.devices())["compile_seconds"]
    print(
        json.dumps(
            dict(
                config=_CONFIG.value.model.image.variant,
                devices=len(jax.devices()),
                platform=jax.devices()[0].platform,
                scan_seconds=seconds[True],
                unrolled_seconds=seconds[False],
                unrolled_over_scan=seconds[False] / seconds[True],
            )
        )
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
