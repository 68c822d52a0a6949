"""From mask-decoder outputs to class probabilities, semantic maps and panoptic segments (host side, NumPy).

- `ensemble`: FC-CLIP's geometric ensemble. The decoder's in-vocabulary probabilities (softmax over the classes and
  void) and the frozen encoder's out-of-vocabulary ones (its dense embeddings pooled inside each predicted mask,
  softmax over the classes) combine as p_in^(1 - a) p_out^a, a = alpha (0.4) for classes the decoder trained on and
  beta (0.8) for the rest; the void probability stays the decoder's and scales the others by (1 - p_void).
- `semantic_scores`: Mask2Former's semantic inference, sum over queries of p(class) x sigmoid(mask).
- `panoptic`: Mask2Former's panoptic inference: queries whose best class is not void and whose score passes
  `object_threshold` each claim the pixels where their score x mask probability is highest; a query keeps its
  segment when at least `overlap_threshold` of its own mask (probability >= 0.5) survives; stuff classes merge
  into one segment per class.
"""

import numpy as np

ALPHA, BETA = 0.4, 0.8  # FC-CLIP's ensemble weights of the out-of-vocabulary scores (seen, unseen classes)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def ensemble(in_vocab: np.ndarray, out_vocab: np.ndarray | None, seen: np.ndarray, alpha=ALPHA, beta=BETA):
    """in_vocab logits [Q, C + 1] (void last), out_vocab logits [Q, C] or None (the decoder alone), seen [C] bool
    -> probabilities [Q, C + 1] (rows sum to 1)."""
    p_in = softmax(in_vocab.astype(np.float64))
    if out_vocab is None:
        return p_in
    void = p_in[:, -1:]
    p_out = softmax(out_vocab.astype(np.float64))
    weight = np.where(seen, alpha, beta)
    mixed = np.exp((1 - weight) * np.log(np.maximum(p_in[:, :-1], 1e-30)) + weight * np.log(np.maximum(p_out, 1e-30)))
    return np.concatenate([mixed / mixed.sum(-1, keepdims=True) * (1 - void), void], -1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def semantic_scores(probs: np.ndarray, mask_logits: np.ndarray) -> np.ndarray:
    """probs [Q, C + 1], mask logits [Q, H, W] -> class scores [H, W, C] (void dropped)."""
    return np.einsum("qc,qhw->hwc", probs[:, :-1], sigmoid(mask_logits))


def panoptic(
    probs: np.ndarray, mask_logits: np.ndarray, things: np.ndarray, object_threshold=0.8, overlap_threshold=0.8
) -> tuple[np.ndarray, dict]:
    """probs [Q, C + 1], mask logits [Q, H, W], things [C] bool -> (segment ids int32 [H, W], 0 = void;
    {id: {"category_id": class index, "isthing": bool, "iscrowd": 0}})."""
    scores, classes = probs[:, :-1].max(-1), probs[:, :-1].argmax(-1)
    keep = (probs.argmax(-1) != probs.shape[-1] - 1) & (scores > object_threshold)
    ids = np.zeros(mask_logits.shape[1:], np.int32)
    segments: dict = {}
    if not keep.any():
        return ids, segments
    masks = sigmoid(mask_logits[keep])
    scores, classes = scores[keep], classes[keep]
    owner = (scores[:, None, None] * masks).argmax(0)
    stuff_ids: dict = {}
    for k, category in enumerate(classes.tolist()):
        own = masks[k] >= 0.5
        region = (owner == k) & own
        if not own.sum() or not region.sum() or region.sum() / own.sum() < overlap_threshold:
            continue
        if not things[category] and category in stuff_ids:  # stuff: one segment per class
            ids[region] = stuff_ids[category]
            continue
        segment = len(segments) + 1
        ids[region] = segment
        segments[segment] = dict(category_id=int(category), isthing=bool(things[category]), iscrowd=0)
        if not things[category]:
            stuff_ids[category] = segment
    return ids, segments
