"""Evaluators chosen by `type` in `config.evals.<name>`; each yields (metric, value) pairs.

Adding an evaluator is one entry in `build` — the trainer never changes.
"""

import ml_collections

from cloc_jax.data import pipeline, scenes
from cloc_jax.evals.retrieval import Retrieval
from cloc_jax.evals.zeroshot import ZeroShot

TYPES = ("retrieval", "zeroshot")


def build(cfg: ml_collections.ConfigDict):
    if cfg.type not in TYPES:
        raise ValueError(f"evaluator type={cfg.type!r}; choose one of {TYPES}")
    if cfg.type == "retrieval":
        return Retrieval()
    return ZeroShot(scenes.CLASS_NAMES, cfg.templates)


def run_all(config: ml_collections.ConfigDict, encoder) -> dict[str, float]:
    """Runs every configured evaluator on its split; returns {"<prefix>/<metric>": value}."""
    results = {}
    for cfg in config.evals.values():
        evaluator = build(cfg)
        batches = pipeline.eval_batches(config, cfg.split, encoder.tokenizer, config.eval_batch_size)
        results.update({f"{evaluator.prefix}/{k}": v for k, v in evaluator.run(encoder, batches)})
    return results
