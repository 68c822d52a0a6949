"""Embeddings of a whole data source on disk, in shards, resumable.

python -m cloc_jax.embed --model=SRC --data=SPEC --out=DIR [--what=images,texts,regions,dense] [--shard_size=4096]

SRC: anything `cloc_jax.load` takes; SPEC: any data source spec (as in training). Each host embeds its
share (every process_count-th record) on its own devices, in batches, and writes
`DIR/{what}-p{process:03d}-{shard:05d}.npz` per shard of `shard_size` records of its share:

    images   ids [n] (record index in the source), embeddings [n, E]
    texts    ids [t], caption [t] (its position among the record's captions), embeddings [t, E]
    regions  ids [r], region [r] (position among the record's usable boxes), boxes [r, 4] (xyxy normalised
             to the square the model saw: `preprocess.region_rule`, every box kept), embeddings [r, E]
    dense    ids [n], geometry [n, 4] (`preprocess.Geometry.as_array`: where the image lies in the input),
             embeddings [n, h, w, E] float16 (every token's cell, `Encoder.dense`; only with --what=...,dense)

Images are embedded as the model's own library preprocesses them (`spec.preprocess`), regions and dense features
in a geometry that keeps every box and pixel (a second pass over the shard when the two differ).

A shard is written to a temporary name and renamed when complete, so a killed run leaves only whole
shards; the rerun skips them and writes the same files an uninterrupted run would. `stats-pNNN.json`
counts the records skipped (unreadable images) and anything over the caps.
"""

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from cloc_jax import distributed, evals, sharding
from cloc_jax.data import pipeline, preprocess, sources
from cloc_jax.evals.runner import EvalRunner
from cloc_jax.weights import load

WHAT = ("images", "texts", "regions", "dense")
PIXEL_LEVEL = ("regions", "dense")  # written from the pass in the geometry that keeps every box and pixel


class Subset:
    """Records `indices` of a source, as a source."""

    def __init__(self, source, indices):
        self.source, self.indices, self.class_names = source, list(indices), source.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[self.indices[i]]


def _shard_path(out: str, what: str, shard: int) -> str:
    return os.path.join(out, f"{what}-p{jax.process_index():03d}-{shard:05d}.npz")


def _save(path: str, arrays: dict) -> None:
    temporary = path.removesuffix(".npz") + ".partial.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)  # atomic: a shard on disk is a whole shard


def _rows(batch: dict, out: dict, what: str) -> dict:
    """The valid rows of one batch's outputs for `what`."""
    valid = batch["valid"]
    if what == "images":
        return dict(ids=batch["index"][valid], embeddings=out["image"][valid])
    if what == "dense":
        return dict(
            ids=batch["index"][valid],
            geometry=batch["geometry"][valid],
            embeddings=out["dense"][valid].astype(np.float16),
        )
    if what == "regions":
        mask = batch["region_mask"] & valid[:, None]
        rows, region = np.nonzero(mask)
        return dict(
            ids=batch["index"][rows], region=region, boxes=batch["boxes"][mask], embeddings=out["regions"][mask]
        )
    mask = batch["caption_mask"] & valid[:, None]
    rows, caption = np.nonzero(mask)
    return dict(ids=batch["index"][rows], caption=caption, tokens=batch["captions"][mask])


def embed(
    model: str,
    data: str,
    out: str,
    what=("images", "texts", "regions"),
    shard_size: int = 4096,
    batch_size: int = 64,
    threads: int = 4,
    max_regions: int = 100,
):
    """Writes every missing shard of this host's share; returns {what: shards written now}."""
    unknown = set(what) - set(WHAT)
    if unknown or not what:
        raise ValueError(f"--what={','.join(what)}: choose from {','.join(WHAT)}")
    encoder = load(model)
    config = evals.eval_config(encoder.spec, batch_size, threads)
    source = sources.from_spec(data, config.image_size, seed=config.data.seed)
    share = range(jax.process_index(), len(source), jax.process_count())
    if not len(share):
        raise ValueError(f"data source {data!r} holds {len(source)} records (none for host {jax.process_index()})")
    os.makedirs(out, exist_ok=True)
    shards = [share[k : k + shard_size] for k in range(0, len(share), shard_size)]
    todo = [k for k in range(len(shards)) if not all(os.path.exists(_shard_path(out, w, k)) for w in what)]
    mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices())  # this host's devices, data-parallel
    runner = EvalRunner(encoder, mesh, batch_size, across_hosts=False)
    rule = encoder.spec.preprocess
    plan = {rule: [w for w in what if w not in PIXEL_LEVEL]}  # geometry -> what its pass writes
    plan.setdefault(preprocess.region_rule(rule), []).extend(w for w in what if w in PIXEL_LEVEL)
    plan = {geometry: kinds for geometry, kinds in plan.items() if kinds}
    stats = pipeline.DataStats()
    total = len(plan) * sum(-(-len(shards[k]) // batch_size) for k in todo)
    bar = tqdm(total=total, desc=f"embed {data[-40:]}", mininterval=1 if sys.stderr.isatty() else 60)
    for k in todo:
        parts = {w: [] for w in what}
        for i, (geometry, kinds) in enumerate(plan.items()):
            needs = frozenset({"image"} | {w for w in kinds if w in PIXEL_LEVEL})
            _, batches = pipeline.eval_batches(
                config, Subset(source, shards[k]), encoder.tokenizer, batch_size, max_regions,
                config.data.eval_max_captions, stats if i == 0 else None, share=False, rule=geometry,
                label_maps="dense" in kinds,
            )  # fmt: skip
            for batch in batches:
                result = runner.outputs(batch, needs)
                for w in kinds:
                    parts[w].append(_rows(batch, result, w))
                bar.update()
        for w in what:
            arrays = {key: np.concatenate([p[key] for p in parts[w]]) for key in parts[w][0]}
            if w == "texts":
                arrays["embeddings"] = runner.encode(arrays.pop("tokens"))
            _save(_shard_path(out, w, k), arrays)
    bar.close()
    with open(os.path.join(out, f"stats-p{jax.process_index():03d}.json"), "w") as f:
        json.dump(stats.snapshot(), f)
    return {w: len(todo) for w in what}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not (FLAGS.model and FLAGS.data and FLAGS.out):
        raise app.UsageError("--model, --data and --out are required")
    logging.set_verbosity(logging.WARNING)
    distributed.initialize()
    try:
        written = embed(
            FLAGS.model, FLAGS.data, FLAGS.out, FLAGS.what, FLAGS.shard_size, FLAGS.batch_size, FLAGS.num_threads,
            FLAGS.max_regions,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {sum(written.values())} shard file(s) in {FLAGS.out}")


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_string("model", None, "export dir, training workdir, hf:DIR, open_clip:DIR, big_vision:FILE")
    flags.DEFINE_string("data", None, "a data source spec (cloc_jax/data/sources.py)")
    flags.DEFINE_string("out", None, "directory for the shards")
    flags.DEFINE_list(
        "what", ["images", "texts", "regions"], "images, texts (every caption), regions (every usable box), dense"
    )
    flags.DEFINE_integer("shard_size", 4096, "records of this host's share per shard")
    flags.DEFINE_integer("batch_size", 64, "images per batch on this host")
    flags.DEFINE_integer("num_threads", 4, "decoding threads")
    flags.DEFINE_integer("max_regions", 100, "boxes per image (more are counted in the stats)")
    app.run(main)
