"""Input pipeline throughput per core, and the share of training time spent waiting for it.

    python bench/input.py                                   # images/s per core at 224 and 336 px
    python bench/input.py --train_config=configs/cloc_b16.py:data=scenes --train_steps=6   # + data/wait_fraction

Records are JPEG photographs' stand-ins (scenes rendered at 640 x 480, quality 90) in ArrayRecord
shards; each goes through the full training transform: decode, random resized crop, flip with left/right
swapped in texts, boxes clipped and dropped, M = 4 regions sampled and padded, captions and region
texts tokenised. One thread, so the rate is per core; a host feeds its chips with `data.num_threads`.
The records carry their masks (RLE) and label maps (8-bit PNG); the rate with `data.masks` (decoded and warped
with the image) is printed beside the rate without.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from cloc_jax.config import load_config_file, set_dotted
from cloc_jax.data import records, transforms
from cloc_jax.data.rows import Preprocess
from cloc_jax.data.scenes import CLASS_NAMES, Scenes
from cloc_jax.tokenizers import from_spec
from cloc_jax.train import train_and_evaluate

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 200, "records to time")
flags.DEFINE_string(
    "train_config", "", "also train this config a few steps on the records and report its wait fraction"
)
flags.DEFINE_integer("train_steps", 6, "steps of that run")
flags.DEFINE_integer("train_batch", 8, "batch of that run")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg_records(n: int) -> list[dict]:
    scenes = Scenes("train", size=n, image_size=480)
    out = []
    for i in range(n):
        scene = scenes[i]
        wide = np.asarray(Image.fromarray(scene["image"]).resize((640, 480)))  # 4:3, like most photos
        nearest = lambda a: np.asarray(Image.fromarray(a).resize((640, 480), Image.NEAREST))  # noqa: E731
        masks = np.stack([nearest(m.astype(np.uint8)) for m in scene["masks"]]).astype(bool)
        semantic = nearest(scene["semantic"].astype(np.int32))
        out.append(dict(scene, image=transforms.encode_image(wide, "JPEG"), masks=masks, semantic=semantic))
    return out


def per_core_rate(source, size: int, masks: bool = False) -> float:
    config = load_config_file(os.path.join(ROOT, "configs", "cloc_b16.py"), "data=scenes")  # its tokenizer
    config.data.augment.update(resize="crop", flip=0.5)
    tokenizer = from_spec(config.tokenizer.to_dict())
    prep = Preprocess(
        tokenizer, config.tokenizer, size, 4, 0.5, augment=config.data.augment, masks=masks, num_classes=41
    )
    rng = np.random.default_rng(0)
    prep.random_map(source[0], rng)  # warm up
    start = time.perf_counter()
    for i in range(len(source)):
        prep.random_map(source[i], rng)
    return len(source) / (time.perf_counter() - start)


def wait_fraction(shards: str, workdir: str) -> dict:
    overrides = {
        "data.train": f"array_record:{shards}",
        "data.augment.resize": "crop",
        "data.augment.flip": 0.5,
        "num_steps": FLAGS.train_steps,
        "batch_size": FLAGS.train_batch,
        "log_every": FLAGS.train_steps,  # one window: every step after the compiled first one
        "eval_every": 0,
        "checkpoint_every": 10**9,
        "model.dtype": "float32",
        "model.remat": "none",
        "mesh.fsdp": 1,
        "mesh.data": -1,
    }
    path, _, arg = FLAGS.train_config.partition(":")  # FILE[:ARG], as --config takes it
    config = set_dotted(load_config_file(path, arg or None), overrides)
    train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return {k: last[k] for k in ("data/wait_fraction", "images_per_s")}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as scratch:
        records.write_shards(jpeg_records(FLAGS.images), os.path.join(scratch, "shards"), 4, CLASS_NAMES)
        shards = os.path.join(scratch, "shards", "*.array_record")
        source = records.ArrayRecordSource(shards)
        for size in (224, 336):
            plain, pixels = per_core_rate(source, size), per_core_rate(source, size, masks=True)
            print(
                f"{size} px: {plain:.0f} images/s per core (640 x 480 JPEG, crop, flip, M = 4); "
                f"{pixels:.0f} with masks and label maps"
            )
        if FLAGS.train_config:
            result = wait_fraction(shards, os.path.join(scratch, "run"))
            print(f"{FLAGS.train_config}: {json.dumps(result)}")


if __name__ == "__main__":
    app.run(main)
