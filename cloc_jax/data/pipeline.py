"""grain pipelines: records -> static-shape numpy batches (regions padded to `max_regions` with a mask).

Train batches come from a checkpointable grain iterator (its state is saved with the model), sharded
across hosts by index, so a resumed run continues at exactly the next batch.
"""

from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np

from cloc_jax.boxes import repair
from cloc_jax.data.scenes import Scenes
from cloc_jax.tokenizers import Tokenizer, tokenize

SOURCES = ("scenes",)


def make_source(data: ml_collections.ConfigDict, split: str, image_size: int):
    if data.source not in SOURCES:
        raise ValueError(f"data.source={data.source!r}; choose one of {SOURCES}")
    size = data.train_size if split == "train" else data.heldout_size
    return Scenes(split, size=size, image_size=image_size, seed=data.seed)


class Preprocess(grain.transforms.RandomMap):
    """One record -> fixed shapes: image [H, W, 3] float32 in [-1, 1], tokens [L], regions [M, ...].

    Boxes are repaired (corners reordered, clipped to [0, 1]); unusable ones (NaN, no area) are
    dropped and counted in `dropped_boxes`. Training samples M of an image's regions at random
    (`random_map`); evaluation keeps the first M (`map`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokenizer_cfg: ml_collections.ConfigDict,
        max_regions: int,
        referring_prob: float = 0,
        num_tags: int = 0,
    ):
        self.tokenizer, self.max_regions, self.referring_prob = tokenizer, max_regions, referring_prob
        self.num_tags = num_tags  # > 0: a multi-hot `image_tags` [num_tags] from the record's tag indices
        self.context_length, self.region_context_length = (
            tokenizer_cfg.context_length,
            tokenizer_cfg.region_context_length,
        )

    def _region_texts(self, texts: list[str]) -> np.ndarray:
        """[M, L'] tokens; padded regions are all zeros."""
        out = np.zeros((self.max_regions, self.region_context_length), np.int32)
        out[: len(texts)] = tokenize(self.tokenizer, texts, self.region_context_length)
        return out

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        return self._process(record, rng)

    def map(self, record: dict) -> dict:
        return self._process(record, None)

    def _process(self, record: dict, rng: np.random.Generator | None) -> dict:
        boxes, keep = repair(record["boxes"])
        kept = np.flatnonzero(keep)
        if rng is not None and len(kept) > self.max_regions:
            kept = np.sort(rng.choice(kept, self.max_regions, replace=False))
        kept = kept[: self.max_regions]
        m, num = self.max_regions, len(kept)
        padded_boxes = np.zeros((m, 4), np.float32)
        padded_boxes[:num] = boxes[kept]
        labels = np.full((m,), -1, np.int32)
        labels[:num] = np.asarray(record["region_labels"])[kept]
        pick = lambda key: [record[key][i] for i in kept]  # noqa: E731
        texts, referring = pick("region_texts"), pick("referring")
        if rng is not None:  # training: some regions are described by their referring expression instead
            texts = [r if rng.random() < self.referring_prob else t for t, r in zip(texts, referring)]
        out = dict(
            index=np.int64(record["index"]),
            image=record["image"].astype(np.float32) / 127.5 - 1.0,
            tokens=tokenize(self.tokenizer, [record["caption"]], self.context_length)[0],
            label=np.int32(record["label"]),
            boxes=padded_boxes,
            region_mask=np.arange(m) < num,
            region_labels=labels,
            region_tokens=self._region_texts(texts),
            referring_tokens=self._region_texts(referring),
            dropped_boxes=np.int32(len(keep) - keep.sum()),
        )
        if self.num_tags:
            out["image_tags"] = np.zeros(self.num_tags, np.float32)
            out["image_tags"][np.asarray(record["tags"], np.int64)] = 1.0
        return out


def tags_enabled(config: ml_collections.ConfigDict) -> bool:
    return config.tags.image_weight > 0 or config.tags.region_weight > 0


def tag_tokens(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> np.ndarray:
    """The tag vocabulary (the source's class names) as region-length tokens [T, L']."""
    names = make_source(config.data, "train", config.image_size).class_names
    return tokenize(tokenizer, list(names), config.tokenizer.region_context_length)


def per_host_batch_size(batch_size: int) -> int:
    if batch_size % jax.process_count():
        raise ValueError(f"batch_size={batch_size} is not divisible by {jax.process_count()} hosts")
    return batch_size // jax.process_count()


def train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> grain.DatasetIterator:
    """Infinite, shuffled, host-sharded train batches; `get_state()`/`set_state()` make it resumable."""
    source = make_source(config.data, "train", config.image_size)
    ds = grain.MapDataset.source(source)[jax.process_index() :: jax.process_count()]
    ds = ds.shuffle(seed=config.data.seed).repeat()
    num_tags = len(source.class_names) if tags_enabled(config) else 0
    prep = Preprocess(tokenizer, config.tokenizer, config.data.max_regions, config.data.referring_prob, num_tags)
    ds = ds.random_map(prep, seed=config.data.seed)
    ds = ds.batch(per_host_batch_size(config.batch_size), drop_remainder=True)
    options = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    return iter(ds.to_iter_dataset(options))


def eval_batches(config: ml_collections.ConfigDict, source, tokenizer: Tokenizer, batch_size: int) -> Iterator[dict]:
    """Every record of `source` once, in order; the last batch is padded and `valid` marks real rows."""
    prep = Preprocess(tokenizer, config.tokenizer, config.data.eval_max_regions)
    ds = grain.MapDataset.source(source).map(prep.map)  # deterministic: the first M regions
    for start in range(0, len(ds), batch_size):
        rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        valid = np.arange(batch_size) < len(rows)
        rows += [rows[-1]] * (batch_size - len(rows))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        yield {**batch, "valid": valid}
