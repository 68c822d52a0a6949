"""Evaluation images/s against training-step images/s of the same model and batch, in one run.

    python bench/eval.py --config=configs/cloc_b16.py:data=scenes --batch=16

The step is the full training step (bench/step.py's, same batch every call). Evaluation is
`evals.evaluate_source` on the embedded held-out scenes, as `python -m cloc_jax.evaluate` runs it: data
decoded in worker threads, batches padded to one shape, the jitted forward over the mesh, outputs
gathered, class prompts encoded (their cost is counted: the cache is cleared before the timed pass). Two
passes: zero-shot (the image tower alone) and every scenes evaluator but the crop baseline (image tower,
Prompter regions and grounding, captions and region texts). Each pass is timed after a warm-up pass
that compiles. Float32 and no remat by default: the fast setting on a CPU, the same for both sides.
Prints one JSON line.
"""

import json
import time

import jax
import ml_collections
from absl import app, flags, logging
from common import median_seconds, real_batch, step_runner
from ml_collections import config_flags

from cloc_jax import evals, sharding
from cloc_jax.data import sources
from cloc_jax.evals import benchmarks
from cloc_jax.inference import Encoder
from cloc_jax.train import build, init_state

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 16, "global batch size, training and evaluation")
_IMAGES = flags.DEFINE_integer("images", 96, "held-out images per evaluation pass")
_STEPS = flags.DEFINE_integer("steps", 3, "timed training steps (after one warm-up)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "model.dtype for both sides")
_REMAT = flags.DEFINE_string("remat", "none", "model.remat for the training step")

PASSES = {
    "zeroshot": ("scenes_zeroshot",),
    "all_but_crops": tuple(n for n in benchmarks.SUITES["scenes"] if n != "scenes_region_crop"),
}


def eval_images_per_s(config, runner, names) -> float:
    data = f"scenes:heldout:{_IMAGES.value}"
    entries = {n: ml_collections.ConfigDict(dict(benchmarks.BENCHMARKS[n], data=data)) for n in names}
    entries = {n: cfg for n, cfg in entries.items() if not evals.not_runnable(cfg, runner.encoder)}
    source = sources.from_spec(data, config.image_size)
    evals.evaluate_source(config, runner, source, entries)  # compiles
    runner.set_params(runner.params)  # class prompts are encoded again in the timed pass
    start = time.perf_counter()
    evals.evaluate_source(config, runner, source, entries)
    return len(source) / (time.perf_counter() - start)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    config.batch_size = config.eval_batch_size = _BATCH.value
    config.model.update(dtype=_DTYPE.value, remat=_REMAT.value)
    mesh = sharding.make_mesh(config.mesh)
    train_seconds = median_seconds(step_runner(config, real_batch(config, mesh), mesh), _STEPS.value)
    tokenizer, model, tx = build(config)
    with jax.set_mesh(mesh):
        state, _ = init_state(config, model, tx, mesh)
    encoder = Encoder(
        model, state.params, tokenizer, config.tokenizer.context_length, config.image_size, config.axis_rules
    )
    runner = evals.runner_for(config, encoder, mesh)
    train = _BATCH.value / train_seconds
    row = dict(config=config.model.image.variant, batch=_BATCH.value, dtype=_DTYPE.value, train_images_per_s=train)
    for name, names in PASSES.items():
        rate = eval_images_per_s(config, runner, names)
        row[f"eval_{name}_images_per_s"] = rate
        row[f"eval_{name}_vs_train"] = rate / train
    print(json.dumps(row))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
