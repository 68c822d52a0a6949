"""grain pipelines: records (records.py) -> rows (rows.py) -> static-shape numpy batches.

Train batches come from a checkpointable grain iterator (its state is saved with the model), sharded
across hosts by index, so a resumed run continues at exactly the next batch. Records that cannot be
used (broken image, no text) are skipped and counted in `DataStats`, which the training loop logs.
"""

import copy
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np

from cloc_jax import tokenizers
from cloc_jax.data import sources
from cloc_jax.data.records import empty_record
from cloc_jax.data.rows import HOST_FIELDS, DataStats, Preprocess
from cloc_jax.models.spec import PreprocessSpec
from cloc_jax.tokenizers import Tokenizer, tokenize

SPLITS = ("train", "heldout")
# The data options evaluation reads (a training config's `data` has them too): shuffling and scenes seed,
# decoding threads and prefetched records, and per image the ground-truth regions (more: counted) and captions
# kept (COCO has up to 7; retrieval scores every one).
EVAL_DATA_DEFAULTS = dict(seed=0, num_threads=2, prefetch=4, eval_max_regions=4, eval_max_captions=8)


def check_split_set(data: ml_collections.ConfigDict, split: str) -> None:
    """One line when `data.<split>` names no source."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    if not data[split].strip():
        raise ValueError(
            f"data.{split} is unset: give a source, e.g. --config.data.{split}=array_record:/data/{split}-*.ar "
            "(spec strings: cloc_jax/data/sources.py), or the config arg data=scenes for the embedded scenes"
        )


def make_source(data: ml_collections.ConfigDict, split: str, image_size: int):
    """The source of `split` from its spec (`data.train` / `data.heldout`, see sources.py)."""
    check_split_set(data, split)
    size = data.train_size if split == "train" else data.heldout_size
    return sources.from_spec(data[split], image_size, scenes_size=size, seed=data.seed)


def tags_enabled(config: ml_collections.ConfigDict) -> bool:
    return config.tags.image_weight > 0 or config.tags.region_weight > 0


def tag_vocabulary(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> np.ndarray | None:
    """UMG-CLIP's tag vocabulary, the training source's class names, as region-length tokens [T, L'] (None
    without tag losses: then neither the data nor the tokenizer is read): a constant of the training step that
    only the data knows, read here once and passed in. Without `tokenizer`, the config's is made."""
    if not tags_enabled(config):
        return None
    names = make_source(config.data, "train", config.image_size).class_names
    tokenizer = tokenizer or tokenizers.from_spec(config.tokenizer)
    return tokenize(tokenizer, list(names), config.tokenizer.region_context_length)


def per_host_batch_size(batch_size: int) -> int:
    if batch_size % jax.process_count():
        raise ValueError(f"batch_size={batch_size} is not divisible by {jax.process_count()} hosts")
    return batch_size // jax.process_count()


# Records tried in order before a run starts; none of them usable is an error (a source that yields
# nothing would otherwise make grain skip records forever).
PROBE_RECORDS = 256


def check_usable(source, prep: Preprocess, spec: str) -> None:
    """One line, within seconds, when this host's share of `source` is empty or its first records are
    all unusable (naming the source and the skip counts)."""
    share = range(jax.process_index(), len(source), jax.process_count())
    if not len(share):
        where = f" (none for host {jax.process_index()} of {jax.process_count()})" if len(source) else ""
        raise ValueError(f"data source {spec!r} holds {len(source)} records{where}")
    probe = copy.copy(prep)  # the same preprocessing, counting into its own stats
    probe.stats = DataStats()
    tried = share[:PROBE_RECORDS]
    if any(probe.map(source[i]) is not None for i in tried):
        return
    counts = ", ".join(f"{k.removeprefix('data/')}: {v}" for k, v in probe.stats.snapshot().items())
    raise ValueError(f"data source {spec!r}: none of its first {len(tried)} records is usable ({counts})")


def train_iterator(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer, stats: DataStats | None = None
) -> grain.DatasetIterator:
    """Infinite, shuffled, host-sharded train batches; `get_state()`/`set_state()` make it resumable.
    A source that yields nothing is a one-line error here, before anything compiles."""
    source = make_source(config.data, "train", config.image_size)
    ds = grain.MapDataset.source(source)[jax.process_index() :: jax.process_count()]
    ds = ds.shuffle(seed=config.data.seed).repeat()
    num_tags = len(source.class_names) if tags_enabled(config) else 0
    prep = Preprocess(
        tokenizer,
        config.tokenizer,
        config.image_size,
        config.data.max_regions,
        config.data.referring_prob,
        num_tags,
        augment=config.data.augment,
        stats=stats,
        masks=config.data.masks,
        num_classes=len(sources.segmentation_classes(source)),
    )
    check_usable(source, prep, config.data.train)
    ds = ds.random_map(prep, seed=config.data.seed).filter(lambda example: example is not None)
    options = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    ds = ds.to_iter_dataset(options).batch(per_host_batch_size(config.batch_size), drop_remainder=True)
    # Batches are assembled in a thread of their own too, not in the training loop's thread.
    return iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2))


def eval_batches(
    config: ml_collections.ConfigDict,
    source,
    tokenizer: Tokenizer,
    per_host: int,
    max_regions: int,
    max_captions: int,
    stats: DataStats | None = None,
    share: bool = True,
    rule: PreprocessSpec | None = None,
    label_maps: bool = False,
    image_size: int = 0,
    masks: bool = False,
) -> tuple[int, Iterator[dict]]:
    """This host's share of `source` (every process_count-th record; with `share=False` all of `source`,
    which the caller chose for this host), every usable record once, in order, decoded by
    `data.num_threads` workers -> (number of batches, batches of `per_host` rows). With `share` the count
    is the same on every host (all run the same collectives): short hosts end in all-padding batches, and
    `valid` marks real rows. `rule`: how images are decoded and resized (`data/preprocess.py`); `label_maps`: rows
    carry each image's label map (a host field) and geometry for the segmentation evaluators; `masks`: its region
    masks and label map at the input's pixels (dense adaptation's PQ); `image_size`: the input's side (0:
    `config.image_size`)."""
    size = image_size or config.image_size
    prep = Preprocess(
        tokenizer, config.tokenizer, size, max_regions, stats=stats, max_captions=max_captions, rule=rule,
        label_maps=label_maps, masks=masks, num_classes=len(sources.segmentation_classes(source)),
    )  # fmt: skip
    hosts = jax.process_count() if share else 1
    count = -(-len(source) // hosts)
    num_batches = -(-count // per_host)
    ds = grain.MapDataset.source(source)[jax.process_index() % hosts :: hosts].map(prep.map)
    options = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    rows = ds.to_iter_dataset(options).filter(lambda row: row is not None)
    return num_batches, _padded(iter(rows), per_host, num_batches, prep)


def _padded(rows: Iterator[dict], per_host: int, num_batches: int, prep: Preprocess) -> Iterator[dict]:
    chunk: list[dict] = []
    made = 0
    for row in rows:
        chunk.append(row)
        if len(chunk) == per_host:
            yield _stack(chunk, per_host)
            made, chunk = made + 1, []
    if chunk:
        yield _stack(chunk, per_host)
        made += 1
    if made < num_batches:  # a host whose share had skipped records, or none
        filler = copy.copy(prep)
        filler.stats = DataStats()  # padding is not data: counted nowhere
        row = filler.map(dict(empty_record(-1, np.zeros((8, 8, 3), np.uint8)), captions=["padding"]))
        for _ in range(num_batches - made):
            yield {**_stack([row], per_host), "valid": np.zeros(per_host, bool)}


def _stack(rows: list[dict], batch_size: int) -> dict:
    """Rows -> a batch of `batch_size` (last row repeated, `valid` False); host fields stay lists (padding None)."""
    valid = np.arange(batch_size) < len(rows)
    pad = batch_size - len(rows)
    out = {k: [r[k] for r in rows] + [None] * pad for k in rows[0] if k in HOST_FIELDS}
    rows = rows + [rows[-1]] * pad
    return {**{k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in HOST_FIELDS}, **out, "valid": valid}
