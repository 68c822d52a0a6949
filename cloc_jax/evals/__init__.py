"""Evaluators chosen by `type` in `config.evals.<name>`; each yields (metric, value) pairs.

Adding an evaluator is one entry in `build` — the trainer never changes.
"""

import ml_collections

from cloc_jax.data import pipeline
from cloc_jax.evals import regions
from cloc_jax.evals.retrieval import Retrieval
from cloc_jax.evals.zeroshot import ZeroShot

TYPES = ("retrieval", "zeroshot", "region_classification", "region_crop", "region_retrieval", "grounding")


def build(cfg: ml_collections.ConfigDict, source):
    """`source` is the evaluation split's data source; class-based evaluators read its `class_names`."""
    if cfg.type not in TYPES:
        raise ValueError(f"evaluator type={cfg.type!r}; choose one of {TYPES}")
    if cfg.type == "retrieval":
        return Retrieval()
    if cfg.type == "region_retrieval":
        return regions.RegionRetrieval()
    if cfg.type == "grounding":
        return regions.Grounding()
    kind = {"zeroshot": ZeroShot, "region_classification": regions.RegionClassification}
    return kind.get(cfg.type, regions.CropClassification)(source.class_names, cfg.templates)


def run_all(config: ml_collections.ConfigDict, encoder) -> dict[str, float]:
    """Runs every configured evaluator on its split (none whose split is unset); returns
    {"<prefix>/<metric>": value}."""
    results = {}
    for cfg in config.evals.values():
        if not config.data[cfg.split]:
            continue
        if cfg.type == "grounding" and encoder.model.prompter is None:
            continue  # only the Prompter has a grounding head (RoIAlign and CLIP-only models do not)
        source = pipeline.make_source(config.data, cfg.split, config.image_size)
        evaluator = build(cfg, source)
        batches = pipeline.eval_batches(config, source, encoder.tokenizer, config.eval_batch_size)
        results.update({f"{evaluator.prefix}/{k}": v for k, v in evaluator.run(encoder, batches)})
    return results
