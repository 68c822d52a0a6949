"""Evaluators chosen by `type` in `config.evals.<name>`; each yields (metric, value) pairs.

An entry (`config.eval_entry`): `type` (TYPES), `data` (a split of `config.data`, e.g. "heldout", or any
source spec), `prefix` of its metric names ("": the entry's name), `templates` (class prompts), `classes`
("": the source's class names; "imagenet": ImageNet-1k's), `present_only` (zero-shot among the classes
that occur), `max_regions` / `max_captions` per image (0: `data.eval_max_*`), `image_size` (0: the model's).
Entries on the same data, geometry and size share one pass over it: each record is decoded once and each batch
goes through the model once. Adding an
evaluator is one entry in `build`; the trainer never changes.
"""

import sys

import jax
import ml_collections
from tqdm import tqdm

from cloc_jax import sharding
from cloc_jax.data import pipeline, preprocess, sources
from cloc_jax.evals import benchmarks, regions
from cloc_jax.evals.retrieval import Retrieval
from cloc_jax.evals.runner import EvalRunner
from cloc_jax.evals.segmentation import SemanticSegmentation
from cloc_jax.evals.zeroshot import ZeroShot
from cloc_jax.models.spec import PreprocessSpec


class NoUsableData(ValueError):
    """An evaluation's data source held no record the pipeline could use."""


TYPES = (
    "retrieval",
    "zeroshot",
    "region_classification",
    "region_crop",
    "region_retrieval",
    "grounding",
    "semantic_segmentation",
    "panoptic",
)


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
    if cfg.type == "semantic_segmentation":
        return SemanticSegmentation(names, templates)
    kind = regions.RegionClassification if cfg.type == "region_classification" else regions.CropClassification
    return kind(names, templates)


def _classes(cfg, source) -> tuple[str, ...]:
    """The class names an entry's evaluator is built with: segmentation scores what the label maps index."""
    return sources.segmentation_classes(source) if cfg.type == "semantic_segmentation" else source.class_names


def eval_config(spec, batch_size: int, num_threads: int) -> ml_collections.ConfigDict:
    """What evaluation reads, for a model's spec (`models.spec.Spec`): its image size and tokenizer, the batch,
    a data-parallel mesh and the evaluation data options. A training run passes its own config, which has them."""
    data = dict(pipeline.EVAL_DATA_DEFAULTS, num_threads=num_threads)
    parts = spec.to_config()
    return ml_collections.ConfigDict(
        dict(
            image_size=spec.image_size,
            tokenizer=parts["tokenizer"],
            preprocess=parts["preprocess"],
            eval_batch_size=batch_size,
            mesh=sharding.DATA_PARALLEL,
            data=data,
            evals={},
        )
    )


def data_spec(config: ml_collections.ConfigDict, cfg) -> str:
    """An entry's source spec: a split of `config.data` by name, else the spec itself ("" = none)."""
    return config.data[cfg.data] if cfg.data in pipeline.SPLITS else cfg.data


def open_source(config: ml_collections.ConfigDict, cfg):
    if cfg.data in pipeline.SPLITS:
        return pipeline.make_source(config.data, cfg.data, config.image_size)
    return sources.from_spec(cfg.data, config.image_size, seed=config.data.seed)


def not_runnable(cfg, encoder) -> str:
    """Why the model cannot run this evaluation ("" when it can): grounding needs a box head (`can_ground`), panoptic
    quality a model with panoptic output (a mask decoder); every other evaluation runs on any model."""
    head = encoder.model.head.description
    if cfg.type == "grounding" and not encoder.can_ground:
        return f"grounding needs a grounding head; this model's region head is {head}"
    if cfg.type == "panoptic":
        return f"panoptic quality needs a model with panoptic output (a mask decoder); this model has {head}"
    return ""


# Image-level evaluations take the model's own preprocessing (its published protocol: CLIP's centre crop, SigLIP's
# squash); the others keep every box and pixel (`preprocess.region_rule`).
IMAGE_LEVEL = ("zeroshot", "retrieval")


def geometry(cfg, rule: PreprocessSpec) -> PreprocessSpec:
    return rule if cfg.type in IMAGE_LEVEL else preprocess.region_rule(rule)


def evaluate_source(config, runner: EvalRunner, source, entries: dict, desc: str = "eval"):
    """Every entry {name: cfg} on `source`, one pass per geometry -> ({"<prefix>/<metric>": value}, {name: its
    pass: "geometry" (as records state it), "images" scored, "data_stats"}). `config.preprocess` is the model's
    rule."""
    rule = PreprocessSpec(**config.preprocess.to_dict())
    groups: dict[tuple[PreprocessSpec, int, int], dict] = {}
    for name, cfg in entries.items():
        groups.setdefault((geometry(cfg, rule), *input_size(cfg, config.image_size)), {})[name] = cfg
    results, passes = {}, {}
    for (pass_rule, size, window), group in groups.items():
        found, facts = _one_pass(config, runner, source, group, pass_rule, (size, window), desc)
        results.update(found)
        passes.update({name: facts for name in group})
    return results, passes


def input_size(cfg, model_size: int) -> tuple[int, int]:
    """An entry's (input side, sliding window or 0): its `image_size` (0: the model's), or with `slide` = k the
    canvas S (k + 1) / 2 that k x k windows of the model's S at stride S / 2 tile."""
    if cfg.slide and cfg.type != "semantic_segmentation":
        raise ValueError(f"slide={cfg.slide}: sliding windows are for semantic_segmentation, not {cfg.type}")
    if cfg.slide and cfg.image_size:
        raise ValueError("give slide (windows of the model's size) or image_size (the whole image), not both")
    if cfg.slide > 1:
        return model_size * (cfg.slide + 1) // 2, model_size
    return cfg.image_size or model_size, 0


def _one_pass(config, runner: EvalRunner, source, entries: dict, rule: PreprocessSpec, sizes: tuple, desc: str):
    """One pass over `source` in one geometry, inputs `sizes` = (side, sliding window or 0), for the entries on it
    -> (metrics, facts of the pass)."""
    size, window = sizes
    evaluators = {name: build(cfg, _classes(cfg, source)) for name, cfg in entries.items()}
    needs = frozenset().union(*(e.needs for e in evaluators.values()))
    regions_cap = max(cfg.max_regions or config.data.eval_max_regions for cfg in entries.values())
    captions_cap = max(cfg.max_captions or config.data.eval_max_captions for cfg in entries.values())
    stats = pipeline.DataStats()
    label_maps = any(getattr(e, "local", False) for e in evaluators.values())
    num_batches, batches = pipeline.eval_batches(
        config,
        source,
        runner.encoder.tokenizer,
        runner.per_host,
        regions_cap,
        captions_cap,
        stats,
        rule=rule,
        label_maps=label_maps,
        image_size=size,
    )
    quiet = jax.process_index() != 0
    usable = 0
    for batch in tqdm(batches, desc, total=num_batches, disable=quiet, mininterval=1 if sys.stderr.isatty() else 60):
        out = runner.outputs(batch, needs, window)
        gathered = runner.gather(batch)
        usable += int(gathered["valid"].sum())
        for evaluator in evaluators.values():
            if getattr(evaluator, "local", False):  # this host's rows, its statistics summed over hosts at the end
                evaluator.update(out, batch, runner)
            else:
                evaluator.update(out, gathered)
    if not usable:
        counts = ", ".join(f"{k.removeprefix('data/')}: {v}" for k, v in stats.snapshot().items())
        raise NoUsableData(f"none of the {len(source)} records of {desc} is usable ({counts or 'no records'})")
    results = {}
    for name, evaluator in evaluators.items():
        prefix = entries[name].prefix or name
        results.update({f"{prefix}/{k}": v for k, v in evaluator.result(runner)})
    slide = f", sliding windows of {window} at stride {window // 2}" if window else ""
    facts = dict(geometry=preprocess.protocol(rule, size) + slide, images=usable, data_stats=stats.snapshot())
    return results, facts


def runner_for(config: ml_collections.ConfigDict, encoder, mesh) -> EvalRunner:
    """The evaluation runner of a training run (built once: its compiled functions are reused)."""
    return EvalRunner(encoder, mesh, pipeline.per_host_batch_size(config.eval_batch_size))


def run_all(config: ml_collections.ConfigDict, runner: EvalRunner) -> dict[str, float]:
    """Runs every configured evaluator (none whose data is unset, none the model cannot run), one pass
    per distinct data source; returns {"<prefix>/<metric>": value}, the same on every host."""
    groups: dict[str, dict] = {}
    for name, cfg in config.evals.items():
        if data_spec(config, cfg) and not not_runnable(cfg, runner.encoder):
            groups.setdefault(data_spec(config, cfg), {})[name] = cfg
    results = {}
    for spec, entries in groups.items():
        source = open_source(config, next(iter(entries.values())))
        results.update(evaluate_source(config, runner, source, entries, desc=f"eval {spec[-40:]}")[0])
    return results
