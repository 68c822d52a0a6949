"""The papers' benchmarks for any model, from one command.

python -m cloc_jax.evaluate --model=SRC --suite=paper [--data.imagenet=tfds:imagenet2012:validation ...]
    [--out=results.json] [--batch_size=256] [--templates=simple] [--seg_size=448 | --seg_slide=3]

--suite takes suites and benchmarks, comma-separated (--suite=scenes,seg or --suite=ade150,voc).

SRC: anything `cloc_jax.load` takes (an export, a training workdir, hf:DIR, open_clip:DIR, big_vision:FILE).
Suites and benchmarks: cloc_jax/evals/benchmarks.py. A benchmark whose data is not there is skipped with
the reason; with several processes (launched as for training) every host evaluates its share.
"""

import json
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from cloc_jax import cpu, distributed, evals, sharding
from cloc_jax.evals import benchmarks
from cloc_jax.weights import load

cpu.order_collectives()  # before JAX makes its backends

_MODEL = flags.DEFINE_string("model", None, "export dir, training workdir, hf:DIR, open_clip:DIR, big_vision:FILE")
_SUITE = flags.DEFINE_string("suite", "paper", f"suites or benchmarks, comma-separated: {', '.join(benchmarks.SUITES)}")
_OUT = flags.DEFINE_string("out", None, "write one JSON record per benchmark and metric here")
_BATCH = flags.DEFINE_integer("batch_size", 256, "images per evaluation batch (all hosts together)")
_THREADS = flags.DEFINE_integer("num_threads", 4, "decoding threads per host")
_SEG_SIZE = flags.DEFINE_integer(
    "seg_size",
    0,
    "input side in pixels of the segmentation benchmarks (0: the model's own; position embeddings follow)",
)
_SEG_SLIDE = flags.DEFINE_integer(
    "seg_slide", 0, "segmentation by k x k windows of the model's size at half-window stride (3: a canvas of 2 S)"
)
_TEMPLATES = flags.DEFINE_enum(
    "templates",
    None,
    ["openai", "simple", "bare"],
    "prompts of the benchmarks that use OpenAI's 80 ImageNet templates: openai (80, as published), simple (7) or "
    "bare (the class name; fast)",
)
_DATA = config_flags.DEFINE_config_dict(
    "data", ml_collections.ConfigDict({name: cfg["data"] for name, cfg in benchmarks.BENCHMARKS.items()})
)


def protocol(cfg: ml_collections.ConfigDict) -> dict:
    out = dict(type=cfg.type, templates=len(cfg.templates), classes=cfg.classes or "the data's own")
    if cfg.type == "semantic_segmentation":
        out["scored"] = "cosines bilinear from the token grid to every pixel of each label map; inputs: geometry"
    return {**out, "present_only": cfg.present_only} if cfg.type == "zeroshot" else out


def benchmark_names(suite: str) -> list[str]:
    """ "scenes,seg" or "ade150,voc" -> the benchmarks, in order, once each; an unknown name is one line."""
    names = []
    for part in (p.strip() for p in suite.split(",") if p.strip()):
        if part not in benchmarks.SUITES and part not in benchmarks.BENCHMARKS:
            raise ValueError(f"--suite={part!r}: not a suite ({', '.join(benchmarks.SUITES)}) or a benchmark")
        names += benchmarks.SUITES.get(part, (part,))
    return list(dict.fromkeys(names))


def run(
    model: str,
    suite: str,
    data: dict,
    batch_size: int,
    num_threads: int,
    templates: str | None = None,
    seg_size: int = 0,
    seg_slide: int = 0,
) -> tuple[list[dict], list[dict]]:
    """-> (records: one per benchmark and metric, skipped: one per benchmark not run, with the reason). `templates`
    replaces OpenAI's 80 ImageNet templates where a benchmark uses them ("simple", "bare"); `seg_size` is the input
    side of the segmentation benchmarks (0: the model's), `seg_slide` their k x k sliding windows."""
    if seg_size and seg_slide:
        raise ValueError(
            "--seg_size (the whole image at that size) and --seg_slide (windows of the model's) exclude each other"
        )
    encoder = load(model)
    config = evals.eval_config(encoder.spec, batch_size, num_threads)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(batch_size, mesh)
    runner = evals.runner_for(config, encoder, mesh)
    records, skipped, groups = [], [], {}
    for name in benchmark_names(suite):
        cfg = ml_collections.ConfigDict(dict(benchmarks.BENCHMARKS[name], data=data[name]))
        if cfg.type == "semantic_segmentation":
            cfg.update(image_size=seg_size or cfg.image_size, slide=seg_slide or cfg.slide)
        if templates and tuple(cfg.templates) == benchmarks.imagenet_templates():
            cfg.templates = ("{}",) if templates == "bare" else benchmarks.imagenet_templates(templates)
        if not cfg.data:
            example = benchmarks.DATA_EXAMPLES.get(name, "SPEC")
            skipped.append(dict(benchmark=name, reason=f"no data: pass --data.{name}={example}"))
        elif evals.not_runnable(cfg, encoder):
            skipped.append(dict(benchmark=name, reason=evals.not_runnable(cfg, encoder)))
        else:
            groups.setdefault(cfg.data, {})[name] = cfg
    for spec, entries in groups.items():
        try:
            source = evals.open_source(config, next(iter(entries.values())))
        except FileNotFoundError as error:  # tfds not prepared, a missing file: skipped, saying why
            reason = f"no data: {str(error).splitlines()[0]}"
            skipped.extend(dict(benchmark=name, reason=reason) for name in entries)
            continue
        try:
            results, passes = evals.evaluate_source(config, runner, source, entries, desc=spec[-40:])
        except evals.NoUsableData as error:  # e.g. a wrong image folder: every image missing
            skipped.extend(dict(benchmark=name, reason=str(error)) for name in entries)
            continue
        for key, value in results.items():
            name, metric = key.split("/", 1)
            facts = passes[name]
            skipped_images = sum(v for k, v in facts["data_stats"].items() if k.startswith("data/skipped/"))
            records.append(
                dict(benchmark=name, metric=metric, value=value, model=model, data=spec, images=facts["images"])
                | dict(skipped_images=skipped_images, data_stats=facts["data_stats"])
                | dict(protocol=dict(protocol(entries[name]), geometry=facts["geometry"]))
            )
        scored = {key.split("/", 1)[0] for key in results}
        for name in entries:  # e.g. label maps all dropped, or no image of a known class: say so
            if name not in scored:
                counts = ", ".join(f"{k.removeprefix('data/')}: {v}" for k, v in passes[name]["data_stats"].items())
                reason = f"nothing to score in {passes[name]['images']} images ({counts or 'no labels'})"
                skipped.append(dict(benchmark=name, reason=reason))
    return records, skipped


def format_table(records: list[dict], skipped: list[dict], suite: str) -> str:
    lines = [f"{'benchmark':<24} {'metric':<10} {'%':>7}"]
    shown = [r for r in records if not r["metric"].startswith("iou/")]  # per-class IoU: in --out's records only
    lines += [f"{r['benchmark']:<24} {r['metric']:<10} {100 * r['value']:7.2f}" for r in shown]
    if suite == "paper":
        found = {f"{r['benchmark']}/{r['metric']}": r["value"] for r in records}
        lines += ["", "CLOC Table 2 columns (zero-shot, %):"]
        lines += [" | ".join(column for column, _ in benchmarks.PAPER_COLUMNS)]
        lines += [" | ".join(f"{100 * found[m]:.1f}" if m in found else "-" for _, m in benchmarks.PAPER_COLUMNS)]
    lines += [f"skipped {s['benchmark']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if not _MODEL.value:
        raise app.UsageError("--model is required")
    distributed.initialize()
    try:
        records, skipped = run(
            _MODEL.value, _SUITE.value, _DATA.value, _BATCH.value, _THREADS.value, _TEMPLATES.value, _SEG_SIZE.value,
            _SEG_SLIDE.value,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if jax.process_index() == 0:
        print(format_table(records, skipped, _SUITE.value), flush=True)
        if _OUT.value:
            with open(_OUT.value, "w") as f:
                json.dump(dict(records=records, skipped=skipped), f, indent=1)
    if not records:
        sys.exit(f"error: no benchmark of suite {_SUITE.value!r} ran (see the reasons above)")


if __name__ == "__main__":
    app.run(main)
