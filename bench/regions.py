"""Cost of the CLOC region stack: the training step with regions (Prompter, M regions, region texts,
grounding) against the same model and batch without them, measured in one run.

    python bench/regions.py --config=configs/cloc_b16.py:data=scenes --batch=16
    python bench/regions.py --config=configs/cloc_b16.py:data=scenes --batch=16 --config.tokenizer.type=words \
        --config.tokenizer.path=cloc_jax/data/scenes_words.txt --config.tokenizer.region_pack_length=32

Prints one JSON line; `ratio` = seconds with regions / seconds without (target <= 1.15).
"""

import json
import statistics

from absl import app, flags, logging
from common import median_seconds, real_batch, step_runner
from ml_collections import config_flags

from cloc_jax import sharding
from cloc_jax.config import clip_twin
from cloc_jax.models.heads import region_head

_CONFIG = config_flags.DEFINE_config_file("config", None, "a cloc_* config", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 16, "global batch size")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per variant (after one warm-up)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    config.batch_size = _BATCH.value
    if not region_head(config.model.region_extractor).trains:
        raise app.UsageError("--config must train regions (a cloc_* config)")
    mesh = sharding.make_mesh(config.mesh)
    batch = real_batch(config, mesh)
    baseline = clip_twin(config.copy_and_resolve_references())
    run_with, run_without = step_runner(config, batch, mesh), step_runner(baseline, batch, mesh)
    # Alternate single steps so drift in the machine's speed affects both alike; compare medians.
    with_regions, without = [], []
    for _ in range(_STEPS.value):
        with_regions.append(median_seconds(run_with, 1))
        without.append(median_seconds(run_without, 1))
    seconds_with, seconds_without = statistics.median(with_regions), statistics.median(without)
    print(
        json.dumps(
            dict(
                config=config.model.image.variant,
                batch=config.batch_size,
                regions_per_image=config.data.max_regions,
                region_context_length=config.tokenizer.region_context_length,
                region_pack_length=config.tokenizer.region_pack_length,
                regions_in_batch=int(batch["region_mask"].sum()),
                seconds_with_regions=seconds_with,
                seconds_without=seconds_without,
                ratio=seconds_with / seconds_without,
            )
        )
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
