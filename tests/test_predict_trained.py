"""`predict` on a trained tiny CLOC: on held-out scenes saved as image files, its box labels and grounded boxes are
right as often as the evaluators say (region/macc, grounding/acc50 on the same images): predict is given the
evaluation's prompt templates (and, once more, bare class names against an evaluator given the same)."""

import os

import numpy as np
import pytest
from PIL import Image

from cloc_jax import load
from cloc_jax.boxes import iou_and_giou
from cloc_jax.config import SCENE_TEMPLATES, eval_entry
from cloc_jax.data.scenes import CLASS_NAMES, Scenes
from cloc_jax.export import export
from cloc_jax.predict import predict, read_image
from cloc_jax.train import train_and_evaluate
from tests.conftest import tiny_config

HELDOUT = 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 32-pixel CLOC trained for 150 steps; its last evaluation covers the first HELDOUT held-out scenes with
    the training templates (region), with the bare class names predict is given (region_named), and grounding."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = tiny_config(num_steps=150, batch_size=32, log_every=50, checkpoint_every=1000, eval_every=150)
    config.optim.update(warmup_steps=10, lr=2e-3)
    config.data.heldout_size = HELDOUT
    with config.unlocked():
        entries = dict(region=config.evals.region, grounding=config.evals.grounding)
        entries["named"] = eval_entry("region_classification", "heldout", prefix="region_named", templates=("{}",))
        config.evals = entries
    results = train_and_evaluate(config, workdir)
    return load(export(workdir, workdir + "_export")), results


def _mean_class_accuracy(right: list[bool], labels: list[int]) -> float:
    right, labels = np.array(right), np.array(labels)
    return float(np.mean([right[labels == c].mean() for c in np.unique(labels)]))


def test_predict_is_right_as_often_as_the_evaluators_say(trained, tmp_path):
    model, results = trained
    heldout = Scenes("heldout", size=HELDOUT, image_size=model.image_size)
    right, right_named, labels, ious = [], [], [], []
    for i in range(HELDOUT):
        scene = heldout[i]
        path = os.path.join(tmp_path, f"{i}.png")
        Image.fromarray(scene["image"]).save(path)
        image = read_image(path)
        out = predict(model, image, CLASS_NAMES, scene["boxes"], scene["referring"], 1, templates=SCENE_TEMPLATES)
        named = predict(model, image, CLASS_NAMES, scene["boxes"], top_k=1)  # bare class names
        right_named += [
            b["labels"][0]["label"] == CLASS_NAMES[c] for b, c in zip(named["boxes"], scene["region_labels"])
        ]
        right += [b["labels"][0]["label"] == CLASS_NAMES[c] for b, c in zip(out["boxes"], scene["region_labels"])]
        labels += list(scene["region_labels"])
        predicted = np.array([g["box"] for g in out["ground"]], np.float32)
        ious += list(iou_and_giou(predicted, scene["boxes"])[0])
    macc, acc50 = _mean_class_accuracy(right, labels), float(np.mean(np.array(ious) >= 0.5))
    macc_named = _mean_class_accuracy(right_named, labels)
    print(f"predict: mAcc {macc:.3f} ({macc_named:.3f} bare names), Acc@0.5 {acc50:.3f}; evaluators: {results}")
    # The same prompts and the same grounding head on the same pixels (read back from PNG files): the same numbers.
    assert macc == pytest.approx(results["region/macc"], abs=1e-6)
    assert macc_named == pytest.approx(results["region_named/macc"], abs=1e-6)
    assert acc50 == pytest.approx(results["grounding/acc50"], abs=1e-6)
    assert macc > 4 / len(CLASS_NAMES) and acc50 > 0.2  # trained: far from chance (1/40 and about 0.05)
