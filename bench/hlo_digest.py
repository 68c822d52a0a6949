"""md5 of the lowered StableHLO of the training step, per config, on 1 and 8 CPU devices: a refactoring that
claims "no behaviour change" prints the same digests before and after.

python bench/hlo_digest.py                       # cloc_tiny, clip_tiny, umg_tiny, umg_tiny_pet, packed texts
python bench/hlo_digest.py --out=/tmp/hlo        # and the StableHLO texts, to diff where digests differ
"""

import hashlib
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from absl import app, flags

from cloc_jax.config import load_config_file, set_dotted
from cloc_jax.data import pipeline
from cloc_jax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = (
    ("cloc_tiny", {}),
    ("clip_tiny", {}),
    ("umg_tiny", {}),
    ("umg_tiny_pet", {}),
    ("cloc_tiny", {"tokenizer.region_pack_length": 32}),
)
# Small shapes (as the tests' tiny_config): the step's program, not its size, is what is compared.
SMALL = {"image_size": 32, "batch_size": 16, "num_steps": 8, "optim.warmup_steps": 2}
SMALL.update({"tokenizer.context_length": 24, "tokenizer.region_context_length": 24})
SMALL.update({"data.train_size": 4096, "data.heldout_size": 40, "data.max_regions": 3})
MESHES = ((1, {"mesh.data": 1}), (8, {"mesh.data": 4, "mesh.fsdp": 2}))

_OUT = flags.DEFINE_string("out", None, "also write each lowered StableHLO text here")


def main(argv):
    del argv
    for name, overrides in CASES:
        for devices, mesh in MESHES:
            config = set_dotted(load_config_file(os.path.join(ROOT, "configs", f"{name}.py")), SMALL)
            config = set_dotted(config, {**mesh, **overrides})
            lowered = aot.lower_step(config, jax.devices()[:devices], pipeline.tag_vocabulary(config))[0]
            text = lowered.as_text()
            tag = f"{name}{'_packed' if overrides else ''}_{devices}dev"
            if _OUT.value:
                os.makedirs(_OUT.value, exist_ok=True)
                with open(os.path.join(_OUT.value, tag + ".mlir"), "w") as f:
                    f.write(text)
            print(tag, hashlib.md5(text.encode()).hexdigest(), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    app.run(main)
