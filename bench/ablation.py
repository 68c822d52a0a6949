"""The UMG-CLIP ablation on the embedded dataset: region extractor, tags, token clustering.

    python bench/ablation.py --workdir=/tmp/ablation [--num_steps=1000]

Trains each variant from scratch (a finished variant is skipped on a rerun), evaluates on the held-out
split, then times each variant's training step back to back in one process (so other load on the
machine cannot favour one row) and prints a markdown table: region/macc, grounding/acc50, region and
image retrieval R@1, training images/s.
"""

import json
import os

from absl import app, flags, logging
from common import median_seconds, real_batch, step_runner

from cloc_jax import sharding
from cloc_jax.config import load_config_file, set_dotted
from cloc_jax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKDIR = flags.DEFINE_string("workdir", None, "one subdirectory per variant", required=True)
_STEPS = flags.DEFINE_integer("num_steps", 1000, "training steps per variant")

NO_TAGS = {"tags.image_weight": 0.0, "tags.region_weight": 0.0}
DPC_KNN = {"model.image.cluster_knn": 5}  # DPC-kNN's and AiluRus's neighbourhood
COPY = {"model.image.cluster_unfold": "copy", **DPC_KNN}  # the papers' clustering
NO_CLUSTERING = {"model.image.cluster_ratio": 0.0, **COPY}  # (unfold and knn unused: as those runs were saved)
SPATIAL = {"model.image.cluster_spatial": 1.0}  # AiluRus's grid distance beside feature distance
VARIANTS = (  # (name, config, overrides); a variant's directory is its name before " ("
    ("Prompter (CLOC)", "cloc_tiny", {}),
    ("RoIAlign", "umg_tiny", {**NO_CLUSTERING, **NO_TAGS}),
    ("RoIAlign + tags", "umg_tiny", NO_CLUSTERING),
    ("RoIAlign + tags + clustering r=0.75 (copy unfold, knn=5: the papers')", "umg_tiny", COPY),
    ("RoIAlign + tags + clustering r=0.75, residual unfold (knn=5)", "umg_tiny", DPC_KNN),
    ("RoIAlign + tags + clustering r=0.75, spatial-aware (copy unfold, knn=5)", "umg_tiny", {**COPY, **SPATIAL}),
    ("RoIAlign + tags + clustering r=0.75, spatial-aware, residual unfold (knn=5)", "umg_tiny", {**DPC_KNN, **SPATIAL}),
    ("RoIAlign + tags + clustering r=0.75, residual unfold, knn=2 (umg_tiny)", "umg_tiny", {}),
)
COLUMNS = (
    "region/macc",
    "grounding/acc50",
    "region/r2t_r1",
    "region/t2r_r1",
    "retrieval/i2t_r1",
    "retrieval/t2i_r1",
    "images_per_s",
)


def variant_config(config_name: str, overrides: dict):
    config = load_config_file(os.path.join(ROOT, "configs", f"{config_name}.py"), f"num_steps={_STEPS.value}")
    set_dotted(config, overrides)
    config.eval_every = _STEPS.value
    return config


def run(name: str, config_name: str, overrides: dict) -> dict:
    """Trains (or finds trained) one variant -> its final held-out metrics."""
    workdir = os.path.join(_WORKDIR.value, name.split(" (")[0].replace(" ", "_").replace("+", "plus").replace("=", ""))
    train_and_evaluate(variant_config(config_name, overrides), workdir)  # returns at once when finished
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {k: v for row in rows if row["step"] == _STEPS.value for k, v in row.items()}


def images_per_s(config_name: str, overrides: dict) -> float:
    """Training throughput of one variant: median of 10 steps on a real batch."""
    config = variant_config(config_name, overrides)
    mesh = sharding.make_mesh(config.mesh)
    batch = real_batch(config, mesh)
    step = step_runner(config, batch, mesh)
    return config.batch_size / median_seconds(step, 10)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    results = [(name, run(name, config, overrides)) for name, config, overrides in VARIANTS]
    for (_, result), (_, config, overrides) in zip(results, VARIANTS):
        result["images_per_s"] = images_per_s(config, overrides)
    print(f"\n{_STEPS.value} steps of batch 64 per variant, held-out split; images/s timed back to back:\n")
    print("| variant | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, r in results:
        cells = [f"{r[c]:.3f}" if c in r and c != "images_per_s" else f"{r.get(c, float('nan')):.0f}" for c in COLUMNS]
        cells = [c if c != "nan" else "—" for c in cells]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
