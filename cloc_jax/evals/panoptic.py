"""Panoptic quality (PQ = SQ x RQ), all / things / stuff, under the COCO panoptic API's rules.

A panoptic map is an int array of segment ids (0 = void) with, per id, {"category_id", "iscrowd"}. Per image: a
predicted and a labelled segment of the same category match when their IoU, counting the prediction's void pixels
out of the union, is over 0.5 (so each matches at most once); unmatched labelled segments are false negatives,
except crowds; an unmatched prediction is a false positive unless over half of it lies on void or on a crowd of its
own category. Per category PQ = sum IoU / (TP + FP / 2 + FN / 2), SQ = sum IoU / TP, RQ = TP / (TP + FP / 2 + FN / 2);
the averages run over the categories with any TP, FP or FN.
"""

import json
import os

import numpy as np
from PIL import Image

from cloc_jax.data.masks import rgb_to_id


def _areas(ids: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(ids, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def image_stats(labels: np.ndarray, label_segments: dict, predicted: np.ndarray, predicted_segments: dict) -> dict:
    """One image -> {category_id: [sum IoU, TP, FP, FN]}. `*_segments`: {segment id: {"category_id", "iscrowd",
    "area" (labels: the file's, as the API reads it; else counted on the map)}}. A predicted id on the map that its
    segments do not list, or a listed one not on the map, is a ValueError."""
    predicted_area = _areas(predicted)
    unknown = set(predicted_area) - set(predicted_segments) - {0}
    if unknown:
        raise ValueError(f"predicted panoptic map has segment ids {sorted(unknown)[:5]} its segments do not list")
    absent = set(predicted_segments) - set(predicted_area)
    if absent:
        raise ValueError(f"predicted segments {sorted(absent)[:5]} are listed but not on the panoptic map")
    label_area = _areas(labels)
    label_area.update({i: s["area"] for i, s in label_segments.items() if "area" in s})
    base = int(predicted.max(initial=0)) + 1  # (label, prediction) pairs as one int64: label * base + prediction
    values, counts = np.unique(labels.astype(np.int64) * base + predicted, return_counts=True)
    joint = {divmod(int(value), base): int(count) for value, count in zip(values, counts)}
    stats: dict[int, list] = {}
    entry = lambda category: stats.setdefault(category, [0.0, 0, 0, 0])  # noqa: E731
    matched_labels, matched_predictions = set(), set()
    for (label, prediction), intersection in joint.items():
        if label == 0 or prediction == 0 or label not in label_segments or prediction not in predicted_segments:
            continue
        segment = label_segments[label]
        if segment.get("iscrowd", 0) or segment["category_id"] != predicted_segments[prediction]["category_id"]:
            continue
        union = label_area[label] + predicted_area[prediction] - intersection - joint.get((0, prediction), 0)
        iou = intersection / union
        if iou > 0.5:
            stats_of = entry(segment["category_id"])
            stats_of[0] += iou
            stats_of[1] += 1
            matched_labels.add(label)
            matched_predictions.add(prediction)
    crowds = {s["category_id"]: i for i, s in label_segments.items() if s.get("iscrowd", 0)}
    for label, segment in label_segments.items():
        if label not in matched_labels and not segment.get("iscrowd", 0):
            entry(segment["category_id"])[3] += 1
    for prediction, segment in predicted_segments.items():
        if prediction in matched_predictions:
            continue
        category = segment["category_id"]
        ignored = joint.get((0, prediction), 0)
        if category in crowds:
            ignored += joint.get((crowds[category], prediction), 0)
        if ignored / predicted_area[prediction] > 0.5:
            continue
        entry(category)[2] += 1
    return stats


def summarize(stats: dict, categories: dict[int, bool]) -> dict:
    """{category_id: [sum IoU, TP, FP, FN]} summed over images; categories {id: isthing} -> {"all" | "things" |
    "stuff": {"pq", "sq", "rq", "n"}}."""
    out = {}
    for name, keep in (("all", None), ("things", True), ("stuff", False)):
        pq = sq = rq = 0.0
        n = 0
        for category, isthing in categories.items():
            if keep is not None and isthing != keep:
                continue
            iou, tp, fp, fn = stats.get(category, (0.0, 0, 0, 0))
            if tp + fp + fn == 0:
                continue
            n += 1
            pq += iou / (tp + 0.5 * fp + 0.5 * fn)
            sq += iou / tp if tp else 0.0
            rq += tp / (tp + 0.5 * fp + 0.5 * fn)
        out[name] = dict(pq=pq / max(n, 1), sq=sq / max(n, 1), rq=rq / max(n, 1), n=n)
    return out


def add(total: dict, stats: dict) -> dict:
    for category, values in stats.items():
        into = total.setdefault(category, [0.0, 0, 0, 0])
        for i, value in enumerate(values):
            into[i] += value
    return total


def _read(folder: str, annotation: dict) -> tuple[np.ndarray, dict]:
    ids = rgb_to_id(np.asarray(Image.open(os.path.join(folder, annotation["file_name"])).convert("RGB")))
    return ids, {s["id"]: s for s in annotation["segments_info"]}


def evaluate_files(label_json: str, label_folder: str, predicted_json: str, predicted_folder: str) -> dict:
    """COCO panoptic files (JSON + PNG folder) of labels and predictions -> `summarize`'s table. Every labelled
    image needs a prediction."""
    with open(label_json) as f:
        labels = json.load(f)
    with open(predicted_json) as f:
        predictions = {a["image_id"]: a for a in json.load(f)["annotations"]}
    categories = {c["id"]: bool(c["isthing"]) for c in labels["categories"]}
    total: dict = {}
    for annotation in labels["annotations"]:
        if annotation["image_id"] not in predictions:
            raise ValueError(f"{predicted_json}: no prediction for image {annotation['image_id']}")
        predicted = _read(predicted_folder, predictions[annotation["image_id"]])
        add(total, image_stats(*_read(label_folder, annotation), *predicted))
    return summarize(total, categories)
