"""Files written by an older cloc_jax (tests/fixtures/v0, made at commit 6ae5a93 by its how_made.py) still load,
compute the embeddings that code computed, and a training run saved by it resumes."""

import json
import os
import shutil

import numpy as np
import pytest

import cloc_jax
from cloc_jax.data import scenes
from cloc_jax.models.spec import PreprocessSpec
from tests.conftest import ROOT, tiny_config

V0 = os.path.join(ROOT, "tests", "fixtures", "v0")
rng = np.random.default_rng(0)  # the inputs how_made.py embedded
IMAGES = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
BOXES = np.array([[[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.9, 0.9]]] * 2, np.float32)
TEXTS = ["large red circle", "small blue star"]


def embeddings(model) -> dict:
    out = dict(image=model.encode_image(IMAGES), text=model.encode_text(TEXTS))
    out["regions"] = model.encode_regions(IMAGES, BOXES)
    if model.can_ground:
        out["ground"] = model.ground(IMAGES, [TEXTS, TEXTS])
    return out


def workdir_copy(tmp_path) -> str:
    """The saved run, its vocabulary path pointed at this checkout's (the spec holds the path it was made at)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(V0, "cloc_workdir"), workdir)
    path = os.path.join(workdir, "checkpoints", "4", "spec", "metadata")
    with open(path) as f:
        spec = json.load(f)
    spec["tokenizer"]["path"] = scenes.WORDS
    with open(path, "w") as f:
        json.dump(spec, f)
    return workdir


@pytest.mark.parametrize("name", ["cloc", "clip", "umg"])
def test_an_old_export_loads_and_embeds_as_it_did(name):
    expected = dict(np.load(os.path.join(V0, f"{name}_expected.npz")))
    model = cloc_jax.load(os.path.join(V0, f"{name}_export"))
    assert model.spec.preprocess == PreprocessSpec()  # no preprocess key then: CLOC's letterbox, as applied then
    got = embeddings(model)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=2e-5, err_msg=key)


def test_an_old_workdir_loads_and_resumes(tmp_path):
    from cloc_jax.train import train_and_evaluate

    workdir = workdir_copy(tmp_path)
    got = embeddings(cloc_jax.load(workdir))
    for key, value in np.load(os.path.join(V0, "cloc_expected.npz")).items():
        np.testing.assert_allclose(got[key], value, atol=2e-5, err_msg=key)
    with open(os.path.join(V0, "cloc_config.json")) as f:
        saved = json.load(f)
    config = tiny_config(saved["config"], **{**saved["overrides"], "num_steps": 6})
    train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]  # resumed at 4, not restarted
