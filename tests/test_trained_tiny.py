"""A tiny CLOC trained for 150 steps: its losses fall, and `predict` on it is right as often as the evaluators
say: on held-out scenes saved as image files, its box labels and grounded boxes score what region/macc and
grounding/acc50 measure on the same images (predict given the evaluation's prompt templates; and bare class names
against an evaluator given the same)."""

import os

import numpy as np
import pytest
from PIL import Image

from cloc_jax import load
from cloc_jax.boxes import iou_and_giou
from cloc_jax.config import SCENE_TEMPLATES, eval_entry
from cloc_jax.data.scenes import CLASS_NAMES, Scenes
from cloc_jax.predict import predict, read_image
from cloc_jax.train import train_and_evaluate
from cloc_jax.weights.native import export
from tests.conftest import tiny_config
from tests.test_train import metric_rows

HELDOUT = 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 32-pixel CLOC trained for 150 steps; its last evaluation covers the first HELDOUT held-out scenes with
    the training templates (region), with the bare class names predict is given (region_named), and grounding."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = tiny_config(num_steps=150, batch_size=32, log_every=15, checkpoint_every=1000, eval_every=150)
    config.optim.update(warmup_steps=10, lr=2e-3)
    config.data.heldout_size = HELDOUT
    with config.unlocked():
        entries = dict(region=config.evals.region, grounding=config.evals.grounding)
        entries["named"] = eval_entry("region_classification", "heldout", prefix="region_named", templates=("{}",))
        config.evals = entries
    results = train_and_evaluate(config, workdir)
    rows = [row for row in metric_rows(workdir) if "loss" in row]
    return load(export(workdir, workdir + "_export")), results, rows


def test_tiny_run_loss_drops(trained):
    rows = trained[2]
    losses, image_text = [r["loss"] for r in rows], [r["loss/image_text"] for r in rows]
    assert len(losses) == 10
    chance = np.log(32)  # the image-text loss of embeddings that carry no information
    # the first row is step 15 (already learning); by the end it is well below chance and below that row
    assert np.mean(image_text[-3:]) < 0.6 * chance and np.mean(image_text[-3:]) < 0.7 * image_text[0], image_text
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses  # region and grounding terms fall too


def _mean_class_accuracy(right: list[bool], labels: list[int]) -> float:
    right, labels = np.array(right), np.array(labels)
    return float(np.mean([right[labels == c].mean() for c in np.unique(labels)]))


def test_predict_is_right_as_often_as_the_evaluators_say(trained, tmp_path):
    model, results, _ = trained
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
