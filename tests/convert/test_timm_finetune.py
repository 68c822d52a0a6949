"""Runs started from open_clip's timm towers through the documented configs (`configs/umg_l14.py:init_from=`:
UMG-CLIP from an EVA-02-CLIP, token clustering on, the paper's initialisation; `configs/cloc_pe_l14.py`: CLOC
from a PE-Core): at step 0 the towers are the checkpoint's, and the runs learn."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("open_clip")
pytest.importorskip("timm")

import flax
import jax

import cloc_jax
from cloc_jax import sharding
from cloc_jax import weights as convert
from cloc_jax.config import base_config, load_config_file
from cloc_jax.inference import Encoder
from cloc_jax.models.spec import from_config
from cloc_jax.models.vit import merge_clustered_encoder
from cloc_jax.train import adopt_architecture, build, init_from, init_state, train_and_evaluate
from tests.conftest import ROOT
from tests.convert import timm_fixtures as tf

RUNS = {"eva02": "umg_l14.py", "pe": "cloc_pe_l14.py"}  # the documented config each tower starts


def _config(name: str, source: str):
    """The paper-scale config with `init_from`, shrunk to this machine: 32 px scenes, float32, no remat, the
    base mesh, AdamW for 12 steps; UMG clusters half the tokens after the first of the tiny tower's two blocks."""
    arg = f"init_from={source},batch_size=16,data=scenes" + (",cluster_ratio=0.5" if name == "eva02" else "")
    config = load_config_file(os.path.join(ROOT, "configs", RUNS[name]), arg)
    with config.unlocked():
        config.update(image_size=32, num_steps=12, log_every=3, eval_every=0, checkpoint_every=1000)
        config.mesh = base_config().mesh
        config.model.update(dtype="float32", remat="none")
        config.optim.update(name="adamw", lr=1e-3, warmup_steps=5)
        config.data.update(train_size=2048, heldout_size=32, max_regions=3)
        if name == "eva02":
            config.model.image.cluster_layer = 1
    return config


@pytest.fixture(scope="module", params=list(RUNS))
def source(request, tmp_path_factory):
    return request.param, "open_clip:" + tf.save(str(tmp_path_factory.mktemp(request.param)), request.param)


def test_step_zero_is_the_imported_model(source):
    """The towers are the checkpoint's: texts embed as the import does; images too, read without clustering
    (clustering after block 1 is UMG's own computation, not the checkpoint's)."""
    name, src = source
    config, weights = _config(name, src), convert.read(src)
    with config.unlocked():
        adopt_architecture(config, weights.spec, src)
    assert config.model.image.variant == "timm/8" and config.model.image.rope_grid == tf.TINY[name][2].rope_grid
    tokenizer, model, tx = build(config)
    with jax.set_mesh(sharding.make_mesh(config.mesh)):
        state, _ = init_state(config, model, tx, sharding.make_mesh(config.mesh))
        state = init_from(state, weights, config.model.scan)
    params, spec = state.params, from_config(config)
    if name == "eva02":
        assert "encoder_clustered" in params["image"]
        flat = merge_clustered_encoder(flax.traverse_util.flatten_dict(jax.device_get(params), sep="/"))
        params, spec = (
            flax.traverse_util.unflatten_dict(flat, sep="/"),
            spec.replace(**{"model.image.cluster_ratio": 0.0}),
        )
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.model.image.cluster_ratio = 0.0
        _, model, _ = build(config)
    ours, imported = Encoder(model, params, tokenizer, spec), cloc_jax.load(src)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    texts = ["a large red circle", "a small blue square"]
    np.testing.assert_allclose(ours.encode_image(images), imported.encode_image(images), atol=1e-5)
    np.testing.assert_allclose(ours.encode_text(texts), imported.encode_text(texts), atol=1e-5)


@pytest.mark.slow
def test_the_run_learns(source, tmp_path):
    name, src = source
    train_and_evaluate(_config(name, src), str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    print(RUNS[name], "from", name, [round(x, 3) for x in losses])
    assert len(losses) == 4 and max(losses[-2:]) < 0.85 * losses[0], losses
