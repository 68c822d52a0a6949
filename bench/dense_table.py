"""The dense-adaptation table on the embedded scenes: cloc_tiny, clip_tiny and umg_tiny backbones, frozen, with and
without Convpass PET, at two input resolutions; held-out mIoU and PQ beside the training-free reading.

    python bench/dense_table.py --exports=cloc=DIR,clip=DIR,umg=DIR --workdir=/tmp/dense_table [--num_steps=500]

Each run is `launch/tpu.py --config=configs/umg_tiny_seg.py:...` in its own process (a finished run, one whose
`results.json` exists, is skipped on a rerun); the table is printed as markdown and written to `table.md`.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXPORTS = flags.DEFINE_string("exports", None, "backbone=export dir, comma-separated", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "one subdirectory per run", required=True)
_STEPS = flags.DEFINE_integer("num_steps", 500, "adaptation steps per run")
_BATCH = flags.DEFINE_integer("batch_size", 16, "images per step")
_SIZES = flags.DEFINE_list("image_sizes", ["64", "80"], "input resolutions (the grid must stay even: 8 px patches)")
_HELDOUT = flags.DEFINE_integer("heldout_size", 256, "held-out scenes evaluated")

READINGS = ("training_free", "decoder", "ensemble")  # MaskCLIP's reading, the decoder alone, + FC-CLIP's ensemble


def run(name: str, export: str, pet: bool, size: int) -> dict:
    workdir = os.path.join(_WORKDIR.value, f"{name}_{'pet' if pet else 'frozen'}_{size}")
    done = os.path.join(workdir, "results.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    arg = f"backbone={name},init_from={export},pet={pet},num_steps={_STEPS.value},batch_size={_BATCH.value}"
    command = [
        sys.executable,
        os.path.join(ROOT, "launch", "tpu.py"),
        f"--config={ROOT}/configs/umg_tiny_seg.py:{arg},image_size={size}",
        f"--config.data.heldout_size={_HELDOUT.value}",
        f"--workdir={workdir}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    with open(done, "w") as f:
        json.dump(results, f)
    return results


def main(argv):
    del argv
    exports = dict(item.split("=", 1) for item in _EXPORTS.value.split(","))
    lines = [
        "| backbone | PET | input | training-free mIoU / PQ | decoder mIoU / PQ (things, stuff) | "
        "decoder + ensemble mIoU / PQ (things, stuff) |",
        "|---|---|---|---|---|---|",
    ]
    done = {}
    for size in map(int, _SIZES.value):  # every backbone at the first size first: a short session still compares
        for name, export in exports.items():
            for pet in (False, True):
                done[name, size, pet] = run(name, export, pet, size)
    for name in exports:
        for size in map(int, _SIZES.value):
            for pet in (False, True):
                found = done[name, size, pet]
                cells = []
                for key in READINGS:
                    cell = f"{found[key + '/miou']:.3f} / {found[key + '/pq']:.3f}"
                    if key != "training_free":
                        cell += f" ({found[key + '/pq_things']:.3f}, {found[key + '/pq_stuff']:.3f})"
                    cells.append(cell)
                lines.append("| " + " | ".join([f"{name}_tiny", "yes" if pet else "no", f"{size} px", *cells]) + " |")
    table = "\n".join(lines)
    with open(os.path.join(_WORKDIR.value, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    app.run(main)
