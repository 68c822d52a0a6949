"""Records without boxes -> records with pseudo-labelled regions (both papers' recipes).

Per image: noun phrases of its captions are the queries (phrases.py); the detector proposes boxes;
boxes under the confidence threshold go (0.1 CLOC, 0.3 UMG-CLIP); class-agnostic NMS keeps the most
confident of overlapping boxes, so a region's caption is its most confident phrase; a box that does
not come back when the image is shifted along its diagonal (mean IoU of the re-detections under
`min_stability`) is unstable and dropped. Beyond the papers, `referring=True` also writes a spatial
referring expression per region ("the red circle left of the blue square", from its nearest neighbour),
so the grounding head learns relations the phrases alone do not carry; it names each object by the
vocabulary's class name its phrase ends with (sizes and other modifiers dropped), else by the phrase.
"""

import dataclasses

import numpy as np

from cloc_jax.annotate.detectors import Detection
from cloc_jax.annotate.phrases import MAX_QUERIES, extract_phrases
from cloc_jax.boxes import iou_and_giou, referring_expressions
from cloc_jax.data import preprocess, transforms

DECODE_SIZE = 1024  # JPEGs decode at the smallest scale still this large (detectors resize anyway)


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    threshold: float = 0.1  # CLOC's OWLv2 threshold; UMG-CLIP used 0.3
    nms_iou: float = 0.5
    jitter: float = 0.05  # shift, as a fraction of the image side, for the stability check
    min_stability: float = 0.5  # mean IoU of the jittered re-detections; 0 turns the check off
    max_queries: int = MAX_QUERIES
    max_regions: int = 32
    referring: bool = False  # the papers' recipes leave referring expressions empty


def nms(detections: list[Detection], iou: float) -> list[Detection]:
    """Greedy class-agnostic non-maximum suppression, most confident first."""
    kept: list[Detection] = []
    for d in sorted(detections, key=lambda d: -d.score):
        if all(iou_and_giou(np.array(d.box), np.array(k.box))[0] <= iou for k in kept):
            kept.append(d)
    return kept


def _shifted(image: np.ndarray, jitter: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The image cropped along its diagonal both ways, with each crop's [x0, y0, x1, y1] in the image."""
    h, w = image.shape[:2]
    dy, dx = max(1, round(jitter * h)), max(1, round(jitter * w))
    if dy >= h or dx >= w:
        return []
    return [
        (image[dy:, dx:], np.array([dx / w, dy / h, 1, 1], np.float32)),
        (image[: h - dy, : w - dx], np.array([0, 0, 1 - dx / w, 1 - dy / h], np.float32)),
    ]


def stability(detector, images: list, queries: list[list[str]], kept: list[list[Detection]], jitter: float) -> list:
    """Per image, [len(kept)] mean IoU between each kept box and its query's best re-detection on
    the image shifted along its diagonal both ways (one batched detector call for all images)."""
    crops, owners = [], []
    for i, image in enumerate(images):
        if kept[i]:
            for crop in _shifted(image, jitter):
                crops.append(crop)
                owners.append(i)
    found = detector.detect([c for c, _ in crops], [queries[i] for i in owners]) if crops else []
    totals = [np.zeros(len(k)) for k in kept]
    counts = np.zeros(len(images))
    for (_, window), i, detections in zip(crops, owners, found):
        counts[i] += 1
        scale, origin = np.tile(window[2:] - window[:2], 2), np.tile(window[:2], 2)
        for j, d in enumerate(kept[i]):
            same = [np.array(e.box) * scale + origin for e in detections if e.query == d.query]
            if same:
                totals[i][j] += max(float(iou_and_giou(np.array(d.box), b)[0]) for b in same)
    return [t / c if c else np.ones(len(t)) for t, c in zip(totals, counts)]


def label_images(detector, images: list[np.ndarray], captions: list[list[str]], cfg: LabelConfig) -> list[list]:
    """Per image: [(box, phrase, score)] after threshold, NMS and the stability check."""
    queries = [list(dict.fromkeys(p for c in caps for p in extract_phrases(c)))[: cfg.max_queries] for caps in captions]
    detections = detector.detect(images, queries)
    kept = [nms([d for d in found if d.score >= cfg.threshold], cfg.nms_iou)[: cfg.max_regions] for found in detections]
    if cfg.min_stability > 0:
        scores = stability(detector, images, queries, kept, cfg.jitter)
        kept = [[d for d, s in zip(k, score) if s >= cfg.min_stability] for k, score in zip(kept, scores)]
    return [[(np.array(d.box, np.float32), q[d.query], d.score) for d in k] for k, q in zip(kept, queries)]


def class_of(phrase: str, class_names) -> int:
    """The class a phrase names: an exact match, else the longest class name it ends with
    ("large red circle" -> "red circle"); -1 for none."""
    matches = [(len(n), i) for i, n in enumerate(class_names) if phrase == n or phrase.endswith(" " + n)]
    return max(matches)[1] if matches else -1


def relabel(records: list[dict], detector, cfg: LabelConfig, class_names=()) -> tuple[list[dict], dict]:
    """Records -> the same records with pseudo-labelled boxes (old boxes replaced) and counts."""
    usable, images, counts = [], [], dict(images=0, skipped=0, regions=0)
    for record in records:
        try:
            images.append(preprocess.decode(record["image"], draft=DECODE_SIZE))
            usable.append(record)
        except transforms.BadImage:
            counts["skipped"] += 1  # kept out of the output: the training pipeline would skip it anyway
    out = []
    for record, regions in zip(usable, label_images(detector, images, [r["captions"] for r in usable], cfg)):
        texts = [phrase for _, phrase, _ in regions]
        boxes = np.stack([b for b, _, _ in regions]) if regions else np.zeros((0, 4), np.float32)
        labels = [class_of(t, class_names) for t in texts]
        # Referring expressions name objects by category, as RefCOCO's do ("the red circle left of the
        # blue square"), and fall back to the phrase for one outside the vocabulary.
        names = [class_names[c] if c >= 0 else t for t, c in zip(texts, labels)]
        out.append(
            dict(
                record,
                boxes=boxes,
                region_texts=texts,
                region_labels=np.array(labels, np.int32),
                referring=referring_expressions(boxes, names) if cfg.referring else [""] * len(texts),
            )
        )
        counts["images"] += 1
        counts["regions"] += len(texts)
    return out, counts
