"""CLOC continued from a transformers CLIP (`init_from=hf:DIR`): the towers are the checkpoint's at step 0, the
region heads are new, and the architecture comes from the checkpoint. (That a run started from imported weights
learns is tests/convert/test_timm_finetune.py's, for EVA-02 and PE through open_clip.)"""

import os

import numpy as np
import pytest

pytest.importorskip("torch")

import jax

import cloc_jax
from cloc_jax import sharding
from cloc_jax import weights as convert
from cloc_jax.config import load_config_file
from cloc_jax.inference import Encoder
from cloc_jax.models.spec import from_config
from cloc_jax.train import adopt_architecture, build, init_from, init_state
from tests.conftest import ROOT
from tests.convert import reference


def _config(source, **overrides):
    arg = "init_from=" + source + ",num_steps=40,batch_size=16,image_size=32,lr=3e-4"
    config = load_config_file(os.path.join(ROOT, "configs", "cloc_finetune.py"), arg)
    config.data.update(train_size=2048, heldout_size=32, max_regions=3)
    config.update(log_every=10, eval_every=0, checkpoint_every=1000)
    config.optim.warmup_steps = 5
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return reference.save_clip(str(tmp_path_factory.mktemp("clip")))


def test_step_zero_is_the_imported_model(clip_dir):
    source = f"hf:{clip_dir}"
    config = _config(source)
    weights = convert.read(source)
    with config.unlocked():
        adopt_architecture(config, weights.spec, source)
    assert config.model.image.width == 48 and config.model.activation == "quick_gelu"
    assert config.tokenizer.type == "hf" and config.model.region_extractor == "prompter"
    tokenizer, model, tx = build(config)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        state, _ = init_state(config, model, tx, mesh)
        state = init_from(state, weights, config.model.scan)
    assert "prompter" in state.params  # a new module, freshly initialised
    ours = Encoder(model, state.params, tokenizer, from_config(config))
    imported = cloc_jax.load(source)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    texts = ["a large red circle", "a small blue square"]
    np.testing.assert_allclose(ours.encode_image(images), imported.encode_image(images), atol=1e-6)
    np.testing.assert_allclose(ours.encode_text(texts), imported.encode_text(texts), atol=1e-6)


def test_a_config_that_disagrees_with_the_checkpoint_is_one_line(clip_dir):
    config = _config(f"hf:{clip_dir}")
    config.model.text.width = 64
    with pytest.raises(ValueError, match=r"model\.text\.width=64 disagrees with the checkpoint's 32"):
        adopt_architecture(config, convert.read(f"hf:{clip_dir}").spec, "hf:x")
