"""The UMG-CLIP ablation on the embedded dataset: region extractor, tags, token clustering.

    python bench/ablation.py --workdir=/tmp/ablation [--num_steps=1000]

Trains each variant from scratch (a finished variant is skipped on a rerun), evaluates on the held-out
split and prints a markdown table: region/macc, grounding/acc50, region and image retrieval R@1,
training images/s.
"""

import json
import os

from absl import app, flags, logging

from cloc_jax.config import load_config_file
from cloc_jax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKDIR = flags.DEFINE_string("workdir", None, "one subdirectory per variant", required=True)
_STEPS = flags.DEFINE_integer("num_steps", 1000, "training steps per variant")

NO_TAGS = {"tags.image_weight": 0.0, "tags.region_weight": 0.0}
VARIANTS = (  # (name, config, overrides)
    ("Prompter (CLOC)", "cloc_tiny", {}),
    ("RoIAlign", "umg_tiny", {"model.image.cluster_ratio": 0.0, **NO_TAGS}),
    ("RoIAlign + tags", "umg_tiny", {"model.image.cluster_ratio": 0.0}),
    ("RoIAlign + tags + clustering r=0.75 (UMG-CLIP)", "umg_tiny", {}),
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


def run(name: str, config_name: str, overrides: dict) -> dict:
    workdir = os.path.join(_WORKDIR.value, name.split(" (")[0].replace(" ", "_").replace("+", "plus").replace("=", ""))
    config = load_config_file(os.path.join(ROOT, "configs", f"{config_name}.py"), f"num_steps={_STEPS.value}")
    for key, value in overrides.items():
        *path, last = key.split(".")
        target = config
        for p in path:
            target = target[p]
        target[last] = value
    config.eval_every = _STEPS.value
    train_and_evaluate(config, workdir)  # resumes, or returns at once when finished
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    final = {k: v for row in rows if row["step"] == _STEPS.value for k, v in row.items()}
    speeds = [row["images_per_s"] for row in rows if "images_per_s" in row]
    final["images_per_s"] = sum(speeds) / max(len(speeds), 1)
    return final


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    results = [(name, run(name, config, overrides)) for name, config, overrides in VARIANTS]
    print(f"\n{_STEPS.value} steps of batch 64 per variant, held-out split:\n")
    print("| variant | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, r in results:
        cells = [f"{r[c]:.3f}" if c in r and c != "images_per_s" else f"{r.get(c, float('nan')):.0f}" for c in COLUMNS]
        cells = [c if c != "nan" else "—" for c in cells]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
