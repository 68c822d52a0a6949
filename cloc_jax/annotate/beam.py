"""The pseudo-labelling pipeline on Apache Beam: ArrayRecord shards in, labelled ArrayRecord shards out.

    python -m cloc_jax.annotate --input='/data/raw/*.array_record' --output=/data/labelled \
        --detector=cloc:/models/cloc_tiny_export --threshold=0.1 [-- --runner=DataflowRunner ...]
    python -m cloc_jax.annotate --input=... --output=... --masker=sam:/models/sam-vit-base   # boxes -> masks

A detector replaces the records' regions with pseudo-labelled ones; a masker (`sam.py`) then writes one SAM mask
per box (records that already have boxes need only the masker).

One element per input shard: a worker builds its detector and masker once (`setup`), labels the shard's records
in batches, writes `<output>/<shard name>` through a temporary file and renames it when complete, so a
rerun skips the shards already there (and a failed worker leaves no half shard). Files go through
Beam's FileSystems (local, gs://, ...); the default DirectRunner runs locally, and the same pipeline
runs on Dataflow, Flink or Spark with their runner options.
"""

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from cloc_jax.annotate import detectors
from cloc_jax.annotate.label import LabelConfig, relabel
from cloc_jax.annotate.sam import MaskConfig, SamMasker, add_masks
from cloc_jax.data import records


def _local_copy(path: str, directory: str) -> str:
    local = os.path.join(directory, os.path.basename(path))
    with FileSystems.open(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return local


COUNTERS = ("shards", "images", "skipped", "regions", "masks", "unstable")


class LabelShard(beam.DoFn):
    def __init__(self, make_detector, cfg: LabelConfig, output_dir: str, class_names: tuple, batch_size: int,
                 make_masker=None, mask_cfg: MaskConfig | None = None):  # fmt: skip
        self.make_detector, self.cfg, self.output_dir = make_detector, cfg, output_dir
        self.class_names, self.batch_size = class_names, batch_size
        self.make_masker, self.mask_cfg = make_masker, mask_cfg or MaskConfig()
        self.counters = {k: Metrics.counter("annotate", k) for k in COUNTERS}

    def setup(self):
        self.detector = self.make_detector() if self.make_detector else None
        self.masker = self.make_masker() if self.make_masker else None

    def process(self, shard: str):
        with tempfile.TemporaryDirectory() as scratch:
            source = records.ArrayRecordSource([_local_copy(shard, scratch)])
            labelled = []
            for start in range(0, len(source), self.batch_size):
                batch = [source[i] for i in range(start, min(start + self.batch_size, len(source)))]
                counts = {}
                if self.detector is not None:
                    batch, counts = relabel(batch, self.detector, self.cfg, self.class_names)
                if self.masker is not None:
                    batch, masked = add_masks(batch, self.masker, self.mask_cfg)
                    counts = {**masked, **counts}  # the detector's image and skip counts come first
                labelled += batch
                for key, value in counts.items():
                    self.counters[key].inc(value)
            local_out = os.path.join(scratch, "out.array_record")
            records.write_shard(local_out, labelled)
            final = FileSystems.join(self.output_dir, os.path.basename(shard))
            partial = final + ".partial"
            with open(local_out, "rb") as src, FileSystems.create(partial) as dst:
                shutil.copyfileobj(src, dst)
            FileSystems.rename([partial], [final])
        self.counters["shards"].inc()
        yield final


def run(
    input_pattern: str,
    output_dir: str,
    detector: str | Callable | None,
    cfg: LabelConfig | None = None,
    batch_size: int = 32,
    pipeline_args: list[str] | None = None,
    masker: str | Callable | None = None,
    mask_cfg: MaskConfig | None = None,
) -> dict[str, int]:
    """Labels every input shard not yet in `output_dir`; returns the pipeline's counters.

    `detector` is a spec (detectors.from_spec) or a picklable zero-argument factory, `masker` a spec
    ('sam:MODEL_DIR') or a factory; every worker builds its own. Either may be None, not both."""
    if detector is None and masker is None:
        raise ValueError("annotate: give a detector (--detector), a masker (--masker) or both")
    if isinstance(detector, str):
        detector = functools.partial(detectors.from_spec, detector, batch_size)
    if isinstance(masker, str):
        masker = functools.partial(SamMasker.from_spec, masker)
    shards = sorted(m.path for m in FileSystems.match([input_pattern])[0].metadata_list)
    if not shards:
        raise FileNotFoundError(f"annotate: no input shards match {input_pattern!r}")
    done = {os.path.basename(m.path) for m in FileSystems.match([FileSystems.join(output_dir, "*")])[0].metadata_list}
    todo = [s for s in shards if os.path.basename(s) not in done]
    class_names = records.read_class_names(os.path.dirname(shards[0]))
    with FileSystems.create(FileSystems.join(output_dir, records.CLASS_NAMES_FILE)) as f:
        f.write(json.dumps(list(class_names)).encode())
    print(f"annotate: {len(shards)} shards, {len(shards) - len(todo)} already labelled, {len(todo)} to do")
    pipeline = beam.Pipeline(options=PipelineOptions(pipeline_args or []))
    _ = (
        pipeline
        | "Shards" >> beam.Create(todo)
        | "Spread" >> beam.Reshuffle()
        | "Label"
        >> beam.ParDo(LabelShard(detector, cfg or LabelConfig(), output_dir, class_names, batch_size, masker, mask_cfg))
    )
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_namespace("annotate"))["counters"]
    totals = {c.key.metric.name: c.committed for c in counters}
    return {"shards": totals.get("shards", 0), **{k: totals[k] for k in COUNTERS[1:] if k in totals}}  # stages run
