"""Evaluators chosen by `type` in `config.evals.<name>`; each yields (metric, value) pairs.

An entry (`config.eval_entry`): `type` (TYPES), `data` (a split of `config.data`, e.g. "heldout", or any
source spec), `prefix` of its metric names ("": the entry's name), `templates` (class prompts), `classes`
("": the source's class names; "imagenet": ImageNet-1k's), `present_only` (zero-shot among the classes
that occur), `max_regions` / `max_captions` per image (0: `data.eval_max_*`). Entries on the same data
share one pass over it: each record is decoded once and each batch goes through the model once. Adding an
evaluator is one entry in `build`; the trainer never changes.
"""

import sys

import jax
import ml_collections
from tqdm import tqdm

from cloc_jax.config import base_config
from cloc_jax.data import pipeline, sources
from cloc_jax.evals import benchmarks, regions
from cloc_jax.evals.device import Device
from cloc_jax.evals.retrieval import Retrieval
from cloc_jax.evals.zeroshot import ZeroShot


class NoUsableData(ValueError):
    """An evaluation's data source held no record the pipeline could use."""


TYPES = ("retrieval", "zeroshot", "region_classification", "region_crop", "region_retrieval", "grounding")


def build(cfg: ml_collections.ConfigDict, class_names):
    """An evaluator from its entry; `class_names` are its data source's (class-based evaluators)."""
    if cfg.type not in TYPES:
        raise ValueError(f"evaluator type={cfg.type!r}; choose one of {TYPES}")
    if cfg.type == "retrieval":
        return Retrieval()
    if cfg.type == "region_retrieval":
        return regions.RegionRetrieval()
    if cfg.type == "grounding":
        return regions.Grounding()
    names = benchmarks.class_names(cfg.classes, class_names)
    templates = tuple(cfg.templates)
    if cfg.type == "zeroshot":
        return ZeroShot(names, templates, present_only=cfg.present_only)
    kind = regions.RegionClassification if cfg.type == "region_classification" else regions.CropClassification
    return kind(names, templates)


def eval_config(spec: dict, batch_size: int, num_threads: int) -> ml_collections.ConfigDict:
    """The settings evaluation reads (image size, tokenizer lengths, data options) for a model's spec."""
    c = base_config()
    c.image_size = spec["image_size"]
    c.tokenizer.update(spec["tokenizer"])
    c.eval_batch_size = batch_size
    c.data.num_threads = num_threads
    c.evals = {}
    return c


def data_spec(config: ml_collections.ConfigDict, cfg) -> str:
    """An entry's source spec: a split of `config.data` by name, else the spec itself ("" = none)."""
    return config.data[cfg.data] if cfg.data in pipeline.SPLITS else cfg.data


def open_source(config: ml_collections.ConfigDict, cfg):
    if cfg.data in pipeline.SPLITS:
        return pipeline.make_source(config.data, cfg.data, config.image_size)
    return sources.from_spec(cfg.data, config.image_size, seed=config.data.seed)


def runnable(cfg, encoder) -> bool:
    """Only the Prompter has a grounding head (RoIAlign and CLIP-only models do not)."""
    return cfg.type != "grounding" or encoder.model.prompter is not None


def evaluate_source(config, device: Device, source, entries: dict, desc: str = "eval"):
    """One pass over `source` for every entry {name: cfg} on it -> ({"<prefix>/<metric>": value}, data
    stats of the pass)."""
    evaluators = {name: build(cfg, source.class_names) for name, cfg in entries.items()}
    needs = frozenset().union(*(e.needs for e in evaluators.values()))
    regions_cap = max(cfg.max_regions or config.data.eval_max_regions for cfg in entries.values())
    captions_cap = max(cfg.max_captions or config.data.eval_max_captions for cfg in entries.values())
    stats = pipeline.DataStats()
    num_batches, batches = pipeline.eval_batches(
        config, source, device.encoder.tokenizer, device.per_host, regions_cap, captions_cap, stats
    )
    quiet = jax.process_index() != 0
    usable = 0
    for batch in tqdm(batches, desc, total=num_batches, disable=quiet, mininterval=1 if sys.stderr.isatty() else 60):
        out = device.outputs(batch, needs)
        gathered = device.gather(batch)
        usable += int(gathered["valid"].sum())
        for evaluator in evaluators.values():
            evaluator.update(out, gathered)
    if not usable:
        counts = ", ".join(f"{k.removeprefix('data/')}: {v}" for k, v in stats.snapshot().items())
        raise NoUsableData(f"none of the {len(source)} records of {desc} is usable ({counts or 'no records'})")
    results = {}
    for name, evaluator in evaluators.items():
        prefix = entries[name].prefix or name
        results.update({f"{prefix}/{k}": v for k, v in evaluator.result(device)})
    return results, stats.snapshot()


def device_for(config: ml_collections.ConfigDict, encoder, mesh) -> Device:
    """The evaluation runner of a training run (built once: its compiled functions are reused)."""
    return Device(encoder, mesh, pipeline.per_host_batch_size(config.eval_batch_size))


def run_all(config: ml_collections.ConfigDict, device: Device) -> dict[str, float]:
    """Runs every configured evaluator (none whose data is unset, none the model cannot run), one pass
    per distinct data source; returns {"<prefix>/<metric>": value}, the same on every host."""
    groups: dict[str, dict] = {}
    for name, cfg in config.evals.items():
        if data_spec(config, cfg) and runnable(cfg, device.encoder):
            groups.setdefault(data_spec(config, cfg), {})[name] = cfg
    results = {}
    for spec, entries in groups.items():
        source = open_source(config, next(iter(entries.values())))
        results.update(evaluate_source(config, device, source, entries, desc=f"eval {spec[-40:]}")[0])
    return results
