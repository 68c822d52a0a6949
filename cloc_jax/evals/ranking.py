"""The ranking arithmetic every evaluator shares: where the right answer lands among the candidates.

Ties count against the model: a candidate scoring exactly as high as the right one ranks before it, so a
model that embeds everything alike scores chance or worse, never 100%.
"""

import numpy as np

CHUNK = 1024  # query rows per similarity block: [CHUNK, K] floats in memory at a time


def label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scores [N, C], labels [N] in [0, C) -> [N] how many other classes score at least the label's."""
    right = np.take_along_axis(scores, labels[:, None], axis=1)
    return (scores >= right).sum(1) - 1


def best_ranks(queries: np.ndarray, keys: np.ndarray, query_group: np.ndarray, key_group: np.ndarray) -> np.ndarray:
    """queries [Q, E], keys [K, E]; a key is right for a query when their groups are equal (an image and
    its captions; a region and texts identical to its caption) -> [Q] the number of wrong keys scoring at
    least the query's best right key (0 = found first). A query with no right key ranks K."""
    ranks = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), CHUNK):
        sim = queries[start : start + CHUNK] @ keys.T  # [q, K]
        right = query_group[start : start + CHUNK, None] == key_group[None, :]
        best = np.where(right, sim, -np.inf).max(1, initial=-np.inf)
        ranks[start : start + CHUNK] = np.where(np.isfinite(best), ((sim >= best[:, None]) & ~right).sum(1), len(keys))
    return ranks


def recalls(ranks: np.ndarray, ks, name: str) -> dict[str, float]:
    """{f"{name}_r{k}": fraction of ranks < k}."""
    return {f"{name}_r{k}": float(np.mean(ranks < k)) for k in ks}


def mean_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy per class present in `labels`, averaged over those classes (COCO/LVIS region mAcc); a class
    with no sample is no class of the mean. Label -1 (unknown) is no class: those samples are left out."""
    return float(np.mean([np.mean(correct[labels == c]) for c in np.unique(labels[labels >= 0])]))
