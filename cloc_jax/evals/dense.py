"""Held-out evaluation of a dense adaptation: semantic mIoU and panoptic PQ of the mask decoder, beside the
training-free reading of the same backbone (MaskCLIP's, `evals/segmentation.py`).

One jitted forward per batch gives the decoder's last-layer masks and class embeddings, the frozen backbone's dense
embeddings (adapters zeroed: the model before adaptation) and those embeddings pooled inside each predicted mask
(FC-CLIP's out-of-vocabulary scores). On the host (`evals/masks.py`): class probabilities with and without the
geometric ensemble; mIoU at each label map's own resolution (scores interpolated through the row's geometry, as
the training-free evaluator does); PQ at the model's input resolution against the row's instance masks (things)
and the label map's stuff classes. The training-free PQ reads its per-pixel classes as segments: one per
connected component of a thing class, one per stuff class. Each host scores its own rows; sums are over hosts.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from scipy import ndimage

from cloc_jax import sharding
from cloc_jax.data import pipeline, sources
from cloc_jax.data.masks import IGNORE
from cloc_jax.evals import masks as mask_inference
from cloc_jax.evals import panoptic
from cloc_jax.evals.segmentation import confusion, predict_classes, scores
from cloc_jax.inference import Encoder
from cloc_jax.models.cloc import Model
from cloc_jax.models.heads import normalize
from cloc_jax.models.mask_decoder import MaskDecoder, backbone_grid, frozen_backbone
from cloc_jax.models.spec import from_config

IDENTITY = np.array([1.0, 1.0, 0.0, 0.0], np.float32)  # the geometry of a map already at the input's pixels
READINGS = ("ensemble", "decoder", "training_free")  # decoder + FC-CLIP ensemble, decoder alone, MaskCLIP's


def make_forward(model: Model, decoder: MaskDecoder):
    """-> forward(params, images [B, S, S, 3]) -> the decoder's last-layer outputs, the frozen backbone's dense
    embeddings and their mask-pooled embeddings (see the module docstring)."""

    def forward(params, images):
        out = decoder.apply({"params": params["decoder"]}, backbone_grid(model, params["backbone"], images))
        masks = out["masks"][-1]  # [B, Q, H, W] at 4x the token grid
        dense = model.apply({"params": frozen_backbone(params["backbone"])}, images, method=Model.dense)
        (b, q), (h, w), size = masks.shape[:2], dense.shape[1:3], images.shape[1:3]
        weights = jax.nn.sigmoid(jax.image.resize(masks, (b, q, h, w), "bilinear"))
        pooled = jnp.einsum("bqhw,bhwe->bqe", weights, dense) / weights.sum((2, 3))[..., None].clip(1e-6)
        return dict(
            masks=masks,
            full=jax.image.resize(masks, (b, q, *size), "bilinear"),  # the input's pixels, for PQ
            classes=out["classes"][-1],
            void=jnp.broadcast_to(out["void"], (b, out["void"].shape[0])),
            scale=jnp.broadcast_to(out["scale"], (b,)),
            clip_scale=jnp.broadcast_to(jnp.exp(params["backbone"]["log_scale"]), (b,)),
            pooled=normalize(pooled),
            dense=dense,
        )

    return forward


def labelled_segments(row: dict, things: np.ndarray, stuff: np.ndarray) -> tuple[np.ndarray, dict]:
    """A masked row at the input's pixels -> (segment ids [S, S], 0 = void: unlabelled pixels; segments): each
    valid region of a thing class its own segment, each stuff class present one segment."""
    semantic = row["semantic"]
    ids = np.zeros(semantic.shape, np.int32)
    segments = {}
    for mask, label, valid in zip(row["region_masks"], row["region_labels"], row["region_mask"]):
        if valid and label >= 0 and things[label] and mask.any():
            ids[mask] = len(segments) + 1
            segments[len(segments) + 1] = dict(category_id=int(label), iscrowd=0)
    for category in stuff:
        region = (semantic == category) & (ids == 0)
        if region.any():
            ids[region] = len(segments) + 1
            segments[len(segments) + 1] = dict(category_id=int(category), iscrowd=0)
    ids[semantic == IGNORE] = 0
    return ids, segments


def segments_of_classes(classes: np.ndarray, things: np.ndarray) -> tuple[np.ndarray, dict]:
    """A per-pixel class map [H, W] -> panoptic segments: a connected component of a thing class each, one segment
    per stuff class."""
    ids = np.zeros(classes.shape, np.int32)
    segments = {}
    for category in np.unique(classes).tolist():
        parts, count = ndimage.label(classes == category) if things[category] else ((classes == category) * 1, 1)
        for part in range(1, count + 1):
            ids[parts == part] = len(segments) + 1
            segments[len(segments) + 1] = dict(category_id=int(category), iscrowd=0)
    return ids, segments


class _Scores:
    """One reading's confusion matrix and PQ statistics ([C, 4]: sum IoU, TP, FP, FN), summed over rows."""

    def __init__(self, num_classes: int):
        self.matrix = np.zeros((num_classes, num_classes), np.int64)
        self.pq = np.zeros((num_classes, 4), np.float64)

    def add(self, predicted: np.ndarray, label_map: np.ndarray, prediction: tuple, labelled: tuple) -> None:
        """A row's predicted classes at its label map's pixels, its predicted and labelled panoptic segments."""
        self.matrix += confusion(predicted, label_map, len(self.matrix))
        for category, values in panoptic.image_stats(*labelled, *prediction).items():
            self.pq[category] += values

    def result(self, prefix: str, things: np.ndarray) -> dict:
        matrix, pq = self.matrix, self.pq
        if jax.process_count() > 1:
            matrix = multihost_utils.process_allgather(matrix).sum(0)
            pq = multihost_utils.process_allgather(pq).sum(0)
        found = scores(matrix)
        table = panoptic.summarize({c: list(v) for c, v in enumerate(pq)}, dict(enumerate(things.tolist())))
        out = {f"{prefix}/miou": float(found["miou"]), f"{prefix}/pacc": float(found["pacc"])}
        for part in ("all", "things", "stuff"):
            suffix = "" if part == "all" else f"_{part}"
            out.update({f"{prefix}/pq{suffix}": table[part]["pq"], f"{prefix}/sq{suffix}": table[part]["sq"]})
        out[f"{prefix}/rq"] = table["all"]["rq"]
        return out


def evaluate(config: ml_collections.ConfigDict, model, decoder, params, tokenizer, mesh, image_size: int = 0) -> dict:
    """The held-out split (`data.heldout`) at `image_size` (0: config.image_size) -> {"<reading>/miou" | "/pq" |
    "/sq" | "/rq" | "/pq_things" | ...} for READINGS."""
    size = image_size or config.image_size
    source = pipeline.make_source(config.data, "heldout", size)
    classes = sources.segmentation_classes(source)
    train_classes = sources.segmentation_classes(pipeline.make_source(config.data, "train", config.image_size))
    seen_set = set(train_classes) - set(config.dense.unseen_classes)
    seen = np.array([c in seen_set for c in classes])
    things = np.array([c not in config.dense.stuff_classes for c in classes])
    stuff = np.flatnonzero(~things)
    backbone = Encoder(model, params["backbone"], tokenizer, from_config(config), config.axis_rules)
    text = backbone.encode_classes(classes, config.dense.templates)
    per_host = pipeline.per_host_batch_size(config.eval_batch_size)
    _, batches = pipeline.eval_batches(
        config, source, tokenizer, per_host, config.data.max_regions, 1, label_maps=True, masks=True, image_size=size
    )
    forward = jax.jit(make_forward(model, decoder))
    spec = sharding.batch_sharding(mesh).spec
    found = {reading: _Scores(len(classes)) for reading in READINGS}
    d = config.dense
    for batch in batches:
        images = sharding.global_batch({"image": batch["image"]}, mesh)["image"]
        out = multihost_utils.global_array_to_host_local_array(forward(params, images), mesh, spec)
        out = jax.tree.map(np.asarray, out)
        for i in np.flatnonzero(batch["valid"]):
            row = {k: v[i] for k, v in batch.items() if k in ("region_masks", "region_labels", "region_mask")}
            row.update(semantic=batch["semantic"][i], label_map=batch["label_map"][i])
            if row["label_map"] is None:
                continue
            labelled = labelled_segments(row, things, stuff)
            in_vocab = out["scale"][i] * out["classes"][i] @ np.concatenate([text, out["void"][i][None]]).T
            out_vocab = out["clip_scale"][i] * out["pooled"][i] @ text.T
            for reading, oov in (("ensemble", out_vocab), ("decoder", None)):
                probs = mask_inference.ensemble(in_vocab, oov, seen, d.alpha, d.beta)
                semantic = mask_inference.semantic_scores(probs, out["masks"][i])
                predicted = predict_classes(semantic, batch["geometry"][i], row["label_map"].shape, size)
                segments = mask_inference.panoptic(
                    probs, out["full"][i], things, d.object_threshold, d.overlap_threshold
                )
                found[reading].add(predicted, row["label_map"], segments, labelled)
            cosines = out["dense"][i] @ text.T
            predicted = predict_classes(cosines, batch["geometry"][i], row["label_map"].shape, size)
            pixels = predict_classes(cosines, IDENTITY, (size, size), size)
            found["training_free"].add(predicted, row["label_map"], segments_of_classes(pixels, things), labelled)
    results = {}
    for reading, kept in found.items():
        results.update(kept.result(reading, things))
    return results
