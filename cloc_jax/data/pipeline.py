"""grain pipelines: records (records.py) -> static-shape numpy batches (regions padded with a mask).

Train batches come from a checkpointable grain iterator (its state is saved with the model), sharded
across hosts by index, so a resumed run continues at exactly the next batch. Records that cannot be
used (broken image, no text) are skipped and counted in `DataStats`, which the training loop logs.
"""

import collections
import copy
import threading
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np

from cloc_jax import tokenizers
from cloc_jax.boxes import repair
from cloc_jax.data import preprocess, sources, transforms
from cloc_jax.data.records import empty_record
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


class DataStats:
    """Thread-safe counters of repaired and skipped inputs (grain maps records in worker threads)."""

    def __init__(self):
        self._lock, self._counts = threading.Lock(), collections.Counter()

    def add(self, key: str, amount: int = 1) -> None:
        if amount:
            with self._lock:
                self._counts[key] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f"data/{k}": v for k, v in sorted(self._counts.items())}


def fits_in_row(tokens: np.ndarray, pack_length: int) -> np.ndarray:
    """[N, L'] zero-padded texts -> [N] bool: in order, the texts that still fit end to end in a row of
    pack_length tokens (`models.text.pack_texts`); a text that does not fit leaves room for later ones."""
    room, fit = pack_length, []
    for length in np.max(np.where(tokens != 0, np.arange(1, tokens.shape[-1] + 1), 0), axis=-1, initial=0):
        fit.append(length <= room)
        room -= length if fit[-1] else 0
    return np.array(fit, bool)


def _fit(values, n: int, fill) -> list:
    """A per-box list cut or padded to the number of boxes (sources can disagree with themselves)."""
    values = list(values)[:n]
    return values + [fill] * (n - len(values))


def _expressions(value) -> list[str]:
    """A box's referring expressions (one string or a list of them) -> the non-empty ones, stripped."""
    values = [value] if isinstance(value, str) else list(value)
    return [t for t in (str(v).strip() for v in values) if t]


class Preprocess(grain.transforms.RandomMap):
    """One record -> fixed shapes: image [S, S, 3] float32 in [-1, 1], tokens [L], regions [M, ...].

    Training (`random_map`, `augment` set) resizes as `augment.resize` says, may flip, samples one caption,
    M regions and one referring expression per region; evaluation (`map`) is deterministic: long-side
    resize + pad, first M regions, and also every caption (`captions` [C, L], `caption_mask` [C]) and every
    (region, referring expression) pair (`ground_boxes` [M, 4], `ground_tokens` [M, L'], `ground_mask`
    [M]); what does not fit in C or M is counted. Boxes are repaired (corners reordered, clipped); unusable
    ones are dropped and counted; a record without a usable image (or, in training, any text) becomes None
    (grain skips it) and is counted. With tags, `image_tags` [T] is multi-hot and `image_tags_valid` (bool) says
    whether the record's source has tags.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokenizer_cfg: ml_collections.ConfigDict,
        image_size: int,
        max_regions: int,
        referring_prob: float = 0,
        num_tags: int = 0,
        augment: ml_collections.ConfigDict | None = None,
        stats: DataStats | None = None,
        max_captions: int = 1,
        rule: PreprocessSpec | None = None,
    ):
        self.tokenizer, self.image_size, self.max_regions = tokenizer, image_size, max_regions
        self.rule = rule or PreprocessSpec()  # evaluation's decode and geometry (`data/preprocess.py`)
        self.max_captions = max_captions  # evaluation: captions kept per image
        self.referring_prob, self.augment, self.stats = referring_prob, augment, stats or DataStats()
        if augment is not None:
            if augment.resize not in transforms.RESIZES:
                raise ValueError(f"data.augment.resize={augment.resize!r}; choose one of {transforms.RESIZES}")
            if augment.flip_texts not in transforms.FLIP_TEXTS:
                raise ValueError(
                    f"data.augment.flip_texts={augment.flip_texts!r}; choose one of {transforms.FLIP_TEXTS}"
                )
            if not 0 <= augment.flip <= 1:
                raise ValueError(f"data.augment.flip={augment.flip} is a probability: use a value in [0, 1]")
        self.num_tags = num_tags  # > 0: `image_tags` [num_tags] and `image_tags_valid` from the record's tags
        self.context_length = tokenizer_cfg.context_length
        self.region_context_length = tokenizer_cfg.region_context_length
        self.region_pack_length = tokenizer_cfg.region_pack_length

    def _region_texts(self, texts: list[str]) -> np.ndarray:
        """[N <= M] texts -> [N, L'] tokens."""
        return tokenize(self.tokenizer, texts, self.region_context_length)

    def _pad_regions(self, tokens: np.ndarray) -> np.ndarray:
        """[N <= M, L'] -> [M, L'] tokens; padded regions are all zeros."""
        out = np.zeros((self.max_regions, self.region_context_length), np.int32)
        out[: len(tokens)] = tokens
        return out

    def random_map(self, record: dict, rng: np.random.Generator) -> dict | None:
        return self._process(record, rng)

    def map(self, record: dict) -> dict | None:
        return self._process(record, None)

    def _geometry(self, image: np.ndarray, boxes: np.ndarray, texts: list, rng) -> tuple:
        """(image [S, S, 3] uint8, boxes, keep [N], flipped)."""
        aug = self.augment if rng is not None else None  # evaluation: deterministic
        if rng is None:  # evaluation: the rule's geometry; boxes follow (a crop may cut some off: dropped)
            image, geometry = preprocess.model_input(image, self.rule, self.image_size)
            boxes, keep = transforms.clip_boxes(geometry.to_model(boxes), 0.0)
        elif aug is not None and aug.resize == "crop":
            image, boxes = transforms.random_resized_crop(image, boxes, self.image_size, rng, tuple(aug.crop_scale))
            boxes, keep = transforms.clip_boxes(boxes, aug.min_visible)
        else:
            image, boxes = transforms.resize_pad(image, boxes, self.image_size)
            keep = np.ones(len(boxes), bool)
        flip = aug is not None and aug.flip > 0 and rng.random() < aug.flip
        if flip and aug.flip_texts == "skip" and transforms.mentions_left_right(texts):
            flip = False
        if flip:
            image, boxes = transforms.hflip(image, boxes)
        return image, boxes, keep, flip

    def _process(self, record: dict, rng: np.random.Generator | None) -> dict | None:
        """One record -> one row, or None (skipped and counted). `rng` is None in evaluation. The steps draw from
        `rng` in a fixed order (expressions, geometry, caption, regions), so a seed gives the same rows."""
        try:
            # evaluation decodes JPEGs in full; training at a reduced scale that still covers the input (faster)
            draft = self.image_size if rng is not None else 0
            image = preprocess.decode(record["image"], self.rule.alpha, draft)
        except transforms.BadImage as error:
            self.stats.add(f"skipped/{error.reason}")
            return None
        boxes, keep = repair(record["boxes"])
        n = len(boxes)
        region_texts = [str(t).strip() for t in _fit(record["region_texts"], n, "")]
        expressions = [_expressions(t) for t in _fit(record["referring"], n, "")]
        if rng is None:  # evaluation: the first expression stands for the box; all of them are grounded
            referring = [e[0] if e else "" for e in expressions]
        else:
            referring = [e[int(rng.integers(len(e)))] if e else "" for e in expressions]
        captions = [c.strip() for c in record["captions"] if isinstance(c, str) and c.strip()]
        texts = captions + region_texts + referring
        self.stats.add("repaired/text", sum("\ufffd" in t for t in texts))
        image, boxes, visible, flipped = self._geometry(image, boxes, texts, rng)
        if flipped:
            captions, region_texts, referring = (
                list(map(transforms.swap_left_right, t)) for t in (captions, region_texts, referring)
            )
        usable = keep & visible & np.array([bool(t) for t in region_texts], bool).reshape(n)
        self.stats.add("dropped/boxes", int((~keep).sum()))
        self.stats.add("dropped/boxes_outside_crop", int((keep & ~visible).sum()))
        self.stats.add("dropped/boxes_without_text", int((keep & visible & ~usable).sum()))
        written = captions  # evaluation scores only the captions the data has
        caption = self._caption(captions, [region_texts[i] for i in np.flatnonzero(usable)], rng)
        if caption is None:
            return None
        kept, chosen_tokens, ref_tokens = self._sample_regions(usable, region_texts, referring, rng)
        labels = np.asarray(_fit(record["region_labels"], n, -1), np.int32)
        out = self._row(record, image, caption, boxes[kept], labels[kept], chosen_tokens, ref_tokens)
        if rng is None:
            out.update(self._every_caption(written))
            pairs = [(i, e) for i in np.flatnonzero(usable) for e in expressions[i] or [region_texts[i]]]
            out.update(self._every_expression(boxes, pairs))
        return out

    def _caption(self, captions: list[str], region_texts: list[str], rng) -> str | None:
        """The caption a row trains on (sampled; evaluation: the first). An image without one is described by
        its usable regions' texts (detection-style data); in training an image with neither is skipped (None),
        in evaluation it keeps an empty caption (an image with a class and no text still counts for zero-shot)."""
        if not captions and region_texts:
            captions = ["a photo of " + ", ".join(dict.fromkeys(region_texts))]
            self.stats.add("repaired/caption_from_regions")
        elif not captions and rng is not None:  # nothing to learn from
            self.stats.add("skipped/no_text")
            return None
        elif not captions:
            captions = [""]
        return captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]

    def _sample_regions(self, usable: np.ndarray, region_texts: list, referring: list, rng) -> tuple:
        """(indices of the kept boxes, their texts [N, L'], their referring expressions [N, L']): training samples
        up to M usable regions, and describes some by their referring expression (`referring_prob`); packed
        training drops the texts that would not fit (counted); evaluation keeps the first M (the rest counted)."""
        kept = np.flatnonzero(usable)
        if rng is not None and len(kept) > self.max_regions:
            kept = np.sort(rng.choice(kept, self.max_regions, replace=False))
        if rng is None:
            self.stats.add("dropped/regions_over_eval_max", max(0, len(kept) - self.max_regions))
        kept = kept[: self.max_regions]
        chosen = [region_texts[i] for i in kept]
        refs = [referring[i] or region_texts[i] for i in kept]
        if rng is not None:  # training: some regions are described by their referring expression instead
            chosen = [r if rng.random() < self.referring_prob else t for t, r in zip(chosen, refs)]
        chosen_tokens, ref_tokens = self._region_texts(chosen), self._region_texts(refs)
        if rng is not None and self.region_pack_length:  # training packs the region texts into one row
            fit = fits_in_row(chosen_tokens, self.region_pack_length)
            self.stats.add("dropped/regions_over_pack_length", int((~fit).sum()))
            kept, chosen_tokens, ref_tokens = kept[fit], chosen_tokens[fit], ref_tokens[fit]
        return kept, chosen_tokens, ref_tokens

    def _row(self, record: dict, image, caption: str, boxes, labels, region_tokens, referring_tokens) -> dict:
        """The fixed-shape row: regions padded to M with a mask; with tags, the record's multi-hot image tags."""
        m, num = self.max_regions, len(boxes)
        padded_boxes = np.zeros((m, 4), np.float32)
        padded_boxes[:num] = boxes
        padded_labels = np.full((m,), -1, np.int32)
        padded_labels[:num] = labels
        out = dict(
            index=np.int64(record["index"]),
            image=image.astype(np.float32) / 127.5 - 1.0,
            tokens=tokenize(self.tokenizer, [caption], self.context_length)[0],
            label=np.int32(record["label"]),
            boxes=padded_boxes,
            region_mask=np.arange(m) < num,
            region_labels=padded_labels,
            region_tokens=self._pad_regions(region_tokens),
            referring_tokens=self._pad_regions(referring_tokens),
        )
        if self.num_tags:
            out["image_tags"] = np.zeros(self.num_tags, np.float32)
            tags = np.asarray(record["tags"], np.int64)
            out["image_tags"][tags[(tags >= 0) & (tags < self.num_tags)]] = 1.0
            out["image_tags_valid"] = np.bool_(record["has_tags"])  # False: tags unknown, not absent
        return out

    def _every_caption(self, captions: list[str]) -> dict:
        """Evaluation: every caption of the image -> captions [C, L], caption_mask [C]."""
        self.stats.add("dropped/captions_over_eval_max", max(0, len(captions) - self.max_captions))
        kept = captions[: self.max_captions]
        tokens = np.zeros((self.max_captions, self.context_length), np.int32)
        tokens[: len(kept)] = tokenize(self.tokenizer, kept, self.context_length)
        return dict(captions=tokens, caption_mask=np.arange(self.max_captions) < len(kept))

    def _every_expression(self, boxes: np.ndarray, pairs: list) -> dict:
        """Evaluation: every (usable box, referring expression) pair, the box's text when it has none ->
        ground_boxes [M, 4], ground_tokens [M, L'], ground_mask [M] (RefCOCO scores each expression)."""
        m = self.max_regions
        self.stats.add("dropped/expressions_over_eval_max", max(0, len(pairs) - m))
        pairs = pairs[:m]
        ground_boxes = np.zeros((m, 4), np.float32)
        ground_boxes[: len(pairs)] = boxes[[i for i, _ in pairs]].reshape(-1, 4)
        return dict(
            ground_boxes=ground_boxes,
            ground_tokens=self._pad_regions(self._region_texts([e for _, e in pairs])),
            ground_mask=np.arange(m) < len(pairs),
        )


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
) -> tuple[int, Iterator[dict]]:
    """This host's share of `source` (every process_count-th record; with `share=False` all of `source`,
    which the caller chose for this host), every usable record once, in order, decoded by
    `data.num_threads` workers -> (number of batches, batches of `per_host` rows). With `share` the count
    is the same on every host (all run the same collectives): short hosts end in all-padding batches, and
    `valid` marks real rows. `rule`: how images are decoded and resized (`data/preprocess.py`)."""
    prep = Preprocess(
        tokenizer, config.tokenizer, config.image_size, max_regions, stats=stats, max_captions=max_captions, rule=rule
    )
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
    valid = np.arange(batch_size) < len(rows)
    rows = rows + [rows[-1]] * (batch_size - len(rows))
    return {**{k: np.stack([r[k] for r in rows]) for k in rows[0]}, "valid": valid}
