"""One record -> one fixed-shape row: what the model and the evaluators read (`Preprocess`).

Records (records.py) come from any source; rows have static shapes (regions padded to M with a mask), so batches
of them compile once. Records or parts that cannot be used are skipped or dropped and counted in `DataStats`.
The pixel level (masks, label maps; `data/masks.py`) goes through the same geometry as the image: a resize,
crop, letterbox or flip moves masks and label maps exactly as it moves pixels and boxes.
"""

import collections
import threading

import grain
import ml_collections
import numpy as np

from cloc_jax.boxes import repair
from cloc_jax.data import masks as pixel_masks
from cloc_jax.data import preprocess, transforms
from cloc_jax.models.spec import PreprocessSpec
from cloc_jax.tokenizers import Tokenizer, tokenize

# Row fields that stay on their host (variable-sized): evaluators that read them sum their statistics over hosts.
HOST_FIELDS = ("label_map",)


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
    whether the record's source has tags. With `masks`, `region_masks` [M, S, S] (bool) and `semantic` [S, S] (int32
    class indices, IGNORE unlabelled or padding) follow the image's geometry; `has_masks` / `has_semantic` say whether
    the record had them. With `label_maps`, `label_map` (int32 [H, W], the record's own resolution, a host field) and
    `geometry` ([4]: `preprocess.Geometry.as_array`) let an evaluator score at the label map's resolution.
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
        masks: bool = False,
        label_maps: bool = False,
        num_classes: int = 0,
    ):
        self.tokenizer, self.image_size, self.max_regions = tokenizer, image_size, max_regions
        # The pixel level: `masks` adds region_masks [M, S, S] and semantic [S, S] aligned with the input;
        # `label_maps` (evaluation) the image's own label map and geometry (`label_map`, `geometry`).
        self.masks, self.label_maps, self.num_classes = masks, label_maps, num_classes
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
        """(image [S, S, 3] uint8, boxes, keep [N], its Geometry, flipped)."""
        aug = self.augment if rng is not None else None  # evaluation: deterministic
        h, w, size = *image.shape[:2], self.image_size
        if rng is None:  # evaluation: the rule's geometry; boxes follow (a crop may cut some off: dropped)
            image, geometry = preprocess.model_input(image, self.rule, size)
            boxes, keep = transforms.clip_boxes(geometry.to_model(boxes), 0.0)
        elif aug is not None and aug.resize == "crop":
            image, boxes, (x0, y0, cw, ch) = transforms.random_resized_crop(
                image, boxes, size, rng, tuple(aug.crop_scale)
            )
            geometry = preprocess.Geometry(h, w, size, (size / cw, size / ch), (x0 * size / cw, y0 * size / ch))
            boxes, keep = transforms.clip_boxes(boxes, aug.min_visible)
        else:
            image, boxes = transforms.resize_pad(image, boxes, size)
            geometry = preprocess.Geometry.letterbox(h, w, size)
            keep = np.ones(len(boxes), bool)
        flip = aug is not None and aug.flip > 0 and rng.random() < aug.flip
        if flip and aug.flip_texts == "skip" and transforms.mentions_left_right(texts):
            flip = False
        if flip:
            image, boxes = transforms.hflip(image, boxes)
        return image, boxes, keep, geometry, flip

    def _pixels(self, record: dict, labels: np.ndarray, height: int, width: int) -> tuple:
        """The record's masks [N, H, W] and label map [H, W] (None where it has none or they cannot be used: counted).
        A record with masks and no label map is painted from its masks' classes."""
        n = len(labels)
        masks, problem = pixel_masks.decode_masks(record.get("masks"), n, height, width)
        self.stats.add(f"dropped/{problem}", int(problem is not None))
        semantic, problem = pixel_masks.decode_semantic(
            record.get("semantic"), height, width, self.num_classes, record.get("semantic_remap")
        )
        self.stats.add(f"dropped/{problem}", int(problem is not None))
        if semantic is None and masks is not None and problem is None:
            semantic = pixel_masks.paint(masks, labels, height, width)
        return masks, semantic

    def _pixel_fields(self, masks, semantic, kept: np.ndarray, geometry, flipped: bool) -> dict:
        """Masks of the kept regions and the label map, warped like the image -> region_masks [M, S, S], semantic."""
        size = self.image_size
        region_masks = np.zeros((self.max_regions, size, size), bool)
        if masks is not None and len(kept):
            region_masks[: len(kept)] = np.moveaxis(geometry.warp(np.moveaxis(masks[kept], 0, -1), False), -1, 0)
        unlabelled = pixel_masks.IGNORE
        label_map = (
            np.full((size, size), unlabelled, np.int32) if semantic is None else geometry.warp(semantic, unlabelled)
        )
        if flipped:
            region_masks, label_map = region_masks[:, :, ::-1], label_map[:, ::-1]
        return dict(
            region_masks=np.ascontiguousarray(region_masks),
            semantic=np.ascontiguousarray(label_map),
            has_masks=np.bool_(masks is not None),
            has_semantic=np.bool_(semantic is not None),
        )

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
        labels = np.asarray(_fit(record["region_labels"], n, -1), np.int32)
        pixels = self._pixels(record, labels, *image.shape[:2]) if self.masks or self.label_maps else (None, None)
        region_texts = [str(t).strip() for t in _fit(record["region_texts"], n, "")]
        expressions = [_expressions(t) for t in _fit(record["referring"], n, "")]
        if rng is None:  # evaluation: the first expression stands for the box; all of them are grounded
            referring = [e[0] if e else "" for e in expressions]
        else:
            referring = [e[int(rng.integers(len(e)))] if e else "" for e in expressions]
        captions = [c.strip() for c in record["captions"] if isinstance(c, str) and c.strip()]
        texts = captions + region_texts + referring
        self.stats.add("repaired/text", sum("\ufffd" in t for t in texts))
        image, boxes, visible, geometry, flipped = self._geometry(image, boxes, texts, rng)
        if flipped:
            captions, region_texts, referring = (
                list(map(transforms.swap_left_right, t)) for t in (captions, region_texts, referring)
            )
        usable = keep & visible & np.array([bool(t) for t in region_texts], bool).reshape(n)
        self.stats.add("dropped/boxes", int((~keep).sum()))
        self.stats.add("dropped/boxes_outside_crop", int((keep & ~visible).sum()))
        self.stats.add("dropped/boxes_without_text", int((keep & visible & ~usable).sum()))
        if self.masks and pixels[0] is not None:  # a box whose mask is empty cannot teach a mask: dropped
            empty = ~pixels[0].reshape(n, -1).any(axis=1)
            self.stats.add("dropped/empty_masks", int((usable & empty).sum()))
            usable &= ~empty
        written = captions  # evaluation scores only the captions the data has
        caption = self._caption(captions, [region_texts[i] for i in np.flatnonzero(usable)], rng)
        if caption is None:
            return None
        kept, chosen_tokens, ref_tokens = self._sample_regions(usable, region_texts, referring, rng)
        out = self._row(record, image, caption, boxes[kept], labels[kept], chosen_tokens, ref_tokens)
        if self.masks:
            out.update(self._pixel_fields(*pixels, kept, geometry, flipped))
        if self.label_maps:
            out.update(label_map=pixels[1], geometry=geometry.as_array())  # label_map None: the record has none
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
