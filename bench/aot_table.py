"""The README's pod table: each paper config compiled for TPU topologies at the paper's batch of 32,768.

    python bench/aot_table.py                       # memory and FLOPs for every row (~2 min per row)
    python bench/aot_table.py --estimate=v5p:8x8x16 # plus XLA's cost-model step time on that topology
                                                    # (two more compiles per row, aot.estimate_step_seconds)

Needs libtpu (pip install -e ".[tpu]"); no TPU. Prints one markdown row per (config, topology).
"""

import json
import os

from absl import app, flags, logging
from common import apply_overrides

from cloc_jax.config import load_config_file
from cloc_jax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = flags.DEFINE_list("configs", ["cloc_b16", "cloc_l14", "cloc_h14"], "config names under configs/")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v4:8x8x8", "v5e:16x16", "v5p:8x8x16"], "libtpu topology names")
_ESTIMATE = flags.DEFINE_list("estimate", [], "topologies that also get the (slow) cost-model estimate")
_OVERRIDES = flags.DEFINE_string("overrides", "", "key=value,... applied to every config, e.g. model.remat=full")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print(
        "| config | topology | devices | mesh (data x fsdp x tensor) | GiB / device (HBM) | fits | model TFLOP/step"
        " | cost-model s/step | cost-model MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in _CONFIGS.value:
        for topology in _TOPOLOGIES.value:
            config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
            apply_overrides(config, list(filter(None, _OVERRIDES.value.split(","))))
            r = aot.compile_for(config, aot.topology_devices(topology), estimate=topology in _ESTIMATE.value)
            mesh = "x".join(str(v) for v in r["mesh"].values())
            step = f"{r['estimated_step_seconds']:.3f}" if r["estimated_step_seconds"] > 0 else ""
            mfu = f"{r['estimated_mfu']:.2f}" if r["estimated_step_seconds"] > 0 else ""
            at_least = ">" if r["arguments_gib"] != r["arguments_gib"] else ""  # NaN: XLA refused, too big
            print(
                f"| {name} | {topology} | {r['devices']} | {mesh} |"
                f" {at_least}{r['per_device_gib']:.1f} ({r['hbm_gib']:.0f}) |"
                f" {'yes' if r['fits'] else 'no'} | {r['model_tflops_per_step']:,.0f} | {step} | {mfu} |",
                flush=True,
            )
            logging.info(json.dumps(r))


if __name__ == "__main__":
    app.run(main)
