"""Every shipped config loads, locks, and builds its model and sharded state abstractly (no compute)."""

import glob
import os
import subprocess
import sys

import jax
import pytest

from cloc_jax import sharding
from cloc_jax.config import load_config_file
from cloc_jax.models.spec import build_model_from_spec, model_spec
from cloc_jax.optim import make_optimizer
from cloc_jax.train import abstract_state, build
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


# cloc_finetune needs a checkpoint to start from (not read here); tags need the training source's classes.
ARGS = {"cloc_finetune.py": "init_from=hf:/weights", "umg_b16.py": "data=scenes", "umg_l14.py": "data=scenes"}


def _load(path, arg=None):
    return load_config_file(path, arg or ARGS.get(os.path.basename(path)))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_abstract_state(path):
    config = _load(path)
    with pytest.raises(AttributeError):
        config.not_a_key = 1  # locked: typos are errors
    model = build_model_from_spec(model_spec(config))  # paper configs: no tokenizer file needed for shapes
    mesh = sharding.make_mesh(config.mesh)
    _, shapes = abstract_state(config, model, make_optimizer(config.optim, config.num_steps), mesh)
    n_params = sum(x.size for x in jax.tree.leaves(shapes.params))
    assert n_params > 1e6


def test_paper_settings():
    b16, l14, h14 = (_load(os.path.join(ROOT, "configs", f"cloc_{n}.py")) for n in ("b16", "l14", "h14"))
    assert (b16.image_size, l14.image_size, h14.image_size) == (224, 336, 336)
    assert b16.model.image.variant == "B/16" and l14.model.image.variant == "L/14" and h14.model.image.variant == "H/14"
    for c in (b16, l14, h14):
        assert c.batch_size == 32_768 and c.tokenizer.context_length == 77
        assert c.optim.name == "lamb" and c.optim.warmup_steps == 2000 and c.optim.weight_decay == 0.2
        assert c.optim.b2 == 0.98 and c.optim.lr == 5e-4  # the paper's AdamW is `--config.optim.name=adamw`


def test_config_arg_overrides_and_rejects_unknown_keys():
    path = os.path.join(ROOT, "configs", "cloc_b16.py")
    assert _load(path, "batch_size=256").batch_size == 256
    with pytest.raises(ValueError, match="config arg 'bogus=1'"):
        _load(path, "bogus=1")


def test_clip_twins_differ_from_cloc_only_in_the_region_stack():
    for name in ("tiny", "b16", "l14", "h14"):
        cloc = _load(os.path.join(ROOT, "configs", f"cloc_{name}.py")).to_dict()
        clip = _load(os.path.join(ROOT, "configs", f"clip_{name}.py")).to_dict()
        assert cloc["model"].pop("region_extractor") == "prompter" and clip["model"].pop("region_extractor") == "none"
        assert cloc["evals"].pop("grounding") and "grounding" not in clip["evals"]
        assert cloc == clip


def test_region_texts_cannot_be_longer_than_the_text_tower():
    config = _load(os.path.join(ROOT, "configs", "cloc_tiny.py"))
    config.tokenizer.region_context_length = 100
    with pytest.raises(ValueError, match=r"tokenizer\.region_context_length=100 exceeds tokenizer\.context_length=24"):
        build(config)


def test_a_pack_row_must_hold_one_region_text():
    config = _load(os.path.join(ROOT, "configs", "cloc_tiny.py"))
    config.tokenizer.region_pack_length = 8
    with pytest.raises(ValueError, match=r"tokenizer\.region_pack_length=8 is shorter than one region text"):
        build(config)


def test_paper_configs_are_set_up_for_real_data():
    """T5's SentencePiece (its size stated, so shapes need no file), no embedded data by default, photo
    prompts; `data=scenes` is the smoke test on the embedded scenes."""
    real, smoke = (_load(os.path.join(ROOT, "configs", "cloc_l14.py"), arg) for arg in (None, "data=scenes"))
    assert real.tokenizer.type == "sentencepiece" and real.model.text.vocab_size == 32_000
    assert real.data.train == real.data.heldout == "" and real.evals.region.templates == ("a photo of a {}.",)
    assert smoke.data.train == "scenes:train" and smoke.tokenizer.type == "bytes"
    with pytest.raises(ValueError, match="config arg data='imagenet'"):
        _load(os.path.join(ROOT, "configs", "cloc_l14.py"), "data=imagenet")


def _launch_l14(tmp_path, *flags):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "tpu.py"), "--config=configs/cloc_l14.py", *flags]
    out = subprocess.run([*cmd, f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode != 0
    return out.stderr.strip().splitlines()


def test_a_paper_config_without_tokenizer_or_data_says_what_to_pass(tmp_path):
    from tests.convert.reference import sentencepiece_model

    lines = _launch_l14(tmp_path)
    assert lines[-1].startswith("error: tokenizer.path='' does not exist") and "--config.tokenizer.path" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    lines = _launch_l14(tmp_path, f"--config.tokenizer.path={sentencepiece_model(str(tmp_path))}")
    assert lines[-1].startswith("error: data.train is unset") and "--config.data.train=" in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_a_paper_config_lowers_without_its_tokenizer_file():
    """The pod's step is traced from the config alone (AOT needs no vocabulary file and no data)."""
    from cloc_jax import aot

    config = _load(os.path.join(ROOT, "configs", "cloc_l14.py"), "batch_size=8")
    lowered, _ = aot.lower_step(config, jax.devices())
    assert lowered.cost_analysis()["flops"] > 0
