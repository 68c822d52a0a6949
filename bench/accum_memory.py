"""What exact gradient accumulation (`optim.accum_steps`) saves: XLA's memory analysis of the training step
compiled for this machine's 8 devices, at one global batch and 1, 4 and 16 micro-batches; then the largest
global batch whose step fits a per-device budget (80 GiB: an A100/H100) at each.

    python bench/accum_memory.py [--configs=cloc_b16,cloc_l14] [--batch=1024] [--accum=1,4,16] [--budget_gib=80] \
        [--overrides=model.remat=dots_no_batch]

The configs as shipped (bf16 activations, float32 parameters and optimizer state FSDP-sharded over the 8
devices, their remat and scanned layers) on the embedded scenes (M = 4 regions an image). Caveat: the step is
compiled by XLA:CPU, whose fusions and buffer assignment are not XLA:GPU's (no cuDNN attention: the CPU holds
[B, H, T, T] attention logits that cuDNN never materialises), so GPU figures differ; the ratios between
accumulation settings are what carries over. Per device = arguments + outputs - donated + temporaries.
The largest batch: a line through the compiled sizes at --batch and twice it, then compiles that check the
candidate (a multiple of 8 x accum), halving the step towards the last one that fitted; printed are the largest
batch compiled and found to fit and the smallest found not to. Memory grows faster than linearly at large
batches: the image-text logits are [B, B] and the region-text logits [B M, B M] (`contrastive=ring` never
holds them whole).
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
from absl import app, flags, logging
from common import apply_overrides

from cloc_jax.config import load_config_file
from cloc_jax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = flags.DEFINE_list("configs", ["cloc_b16", "cloc_l14"], "config names under configs/")
_BATCH = flags.DEFINE_integer("batch", 1024, "the fixed global batch of the table")
_ACCUM = flags.DEFINE_list("accum", ["1", "4", "16"], "micro-batch counts")
_BUDGET = flags.DEFINE_float("budget_gib", 80.0, "per-device memory the largest batch must fit")
_CHECKS = flags.DEFINE_integer("checks", 3, "compiles spent checking the largest-batch candidate")
_OVERRIDES = flags.DEFINE_list("overrides", [], "key=value,... set on every config, e.g. model.remat=full")


def compiled_gib(name: str, batch: int, accum: int) -> dict:
    config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), "data=scenes")
    config.batch_size, config.optim.accum_steps = batch, accum
    return aot.compile_for(apply_overrides(config, _OVERRIDES.value), jax.devices())


def largest_batch(name: str, accum: int, at: dict, budget: float) -> tuple[int, float, int, float]:
    """(the largest batch compiled and found to fit `budget` GiB a device, its GiB; the smallest found not to,
    its GiB); 0 and nan where none was."""
    unit = 8 * accum
    twice = compiled_gib(name, 2 * at["batch_size"], accum)
    per_example = (twice["per_device_gib"] - at["per_device_gib"]) / at["batch_size"]
    fits, fits_gib, fails, fails_gib = 0, float("nan"), None, float("nan")
    for r in (at, twice):
        if r["per_device_gib"] <= budget:
            fits, fits_gib = r["batch_size"], r["per_device_gib"]
        elif fails is None:
            fails, fails_gib = r["batch_size"], r["per_device_gib"]
    guess = at["batch_size"] + (budget - at["per_device_gib"]) / per_example  # the line through the two
    for _ in range(_CHECKS.value):
        guess = int(guess) // unit * unit
        if guess <= fits or (fails is not None and guess >= fails):
            break
        gib = compiled_gib(name, guess, accum)["per_device_gib"]
        logging.warning("%s accum %d: batch %d -> %.1f GiB", name, accum, guess, gib)
        if gib <= budget:
            fits, fits_gib = guess, gib
        else:
            fails, fails_gib = guess, gib
        guess = fits * 1.25 if fails is None else (fits + fails) / 2
    return fits, fits_gib, fails or 0, fails_gib


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    budget = _BUDGET.value
    print(
        f"| config | accum | batch | micro-batch | arguments GiB | temporaries GiB | GiB / device |"
        f" largest batch found to fit {budget:.0f} GiB (its GiB) | smallest found not to (its GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in _CONFIGS.value:
        for accum in map(int, _ACCUM.value):
            r = compiled_gib(name, _BATCH.value, accum)
            most, most_gib, least, least_gib = largest_batch(name, accum, r, budget)
            print(
                f"| {name} | {accum} | {_BATCH.value:,} | {_BATCH.value // accum:,} | {r['arguments_gib']:.2f} |"
                f" {r['temporaries_gib']:.2f} | {r['per_device_gib']:.2f} | {most:,} ({most_gib:.1f}) |"
                f" {least:,} ({least_gib:.1f}) |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
