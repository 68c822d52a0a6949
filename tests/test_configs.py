"""Every shipped config loads, locks, and builds its model and sharded state abstractly (no compute)."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cloc_jax import sharding, tokenizers
from cloc_jax.config import load_config_file
from cloc_jax.models.build import build as build_model
from cloc_jax.models.spec import from_config
from cloc_jax.optim import make_optimizer, schedule
from cloc_jax.train import abstract_state, build
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


# cloc_finetune needs a checkpoint to start from (not read here). The UMG configs need no data to build.
ARGS = {"cloc_finetune.py": "init_from=hf:/weights", "cloc_pe_l14.py": "init_from=open_clip:/weights"}


def _load(path, arg=None):
    return load_config_file(path, arg or ARGS.get(os.path.basename(path)))


# Width, depth and MLP size of the ViT paper's B, L and H (mu: this framework's test size); heads change no count.
VIT_SIZES = {"mu": (128, 4, 512), "B": (768, 12, 3072), "L": (1024, 24, 4096), "H": (1280, 32, 5120)}


def _block(d: int, mlp: int) -> int:
    """One pre-LN block: ln1, q/k/v/out (kernels [D, H, D/H] / [H, D/H, D], biases [H, D/H] / [D]), ln2, MLP."""
    return 2 * d + 4 * (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)


def expected_params(config) -> dict[str, int]:
    """Parameter counts per top-level module, from the architecture's formula and the config's sizes."""
    m, im, t = config.model, config.model.image, config.model.text
    name, _, patch = im.variant.partition("/")
    d, depth, mlp = (im.width, im.depth, im.mlp_dim) if im.width else VIT_SIZES[name]
    p, e = int(patch), m.embed_dim
    grid = im.posemb_grid or config.image_size // p
    image = p * p * 3 * d + d * im.patch_bias + grid * grid * d + 2 * d * im.ln_pre  # patches, positions, ln_pre
    image += depth * _block(d, mlp) + 2 * d  # blocks (split at the clustering layer or not: same count), ln_post
    if im.adapter_dim:  # two Convpass per block: 1x1 down, 3x3 conv, 1x1 up, with biases
        a = im.adapter_dim
        image += depth * 2 * ((d * a + a) + (9 * a * a + a) + (a * d + d))
    image += {"cls": d, "gap": 0, "map": d + 4 * (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)}[im.pool]
    image += (d * e + e * im.proj_bias) * im.project
    vocab = t.vocab_size or tokenizers.from_spec(config.tokenizer.to_dict()).padded_vocab_size
    w, context = t.width, config.tokenizer.context_length
    text = vocab * w + context * w + t.depth * _block(w, t.mlp_dim) + 2 * w + w * e + e * t.proj_bias
    want = dict(image=image, text=text, log_scale=1)
    if m.loss == "sigmoid":
        want["bias"] = 1
    if m.region_extractor == "prompter":  # single-layer, single-head encoder at the ViT width, MLP ratio 4
        dense = d * d + d
        want["prompter"] = (
            dense + 2 * d + (e * d + d) + dense  # corner_proj, corner_type, text_proj, key_pos
            + 4 * 2 * d + 4 * dense  # ln_kv, ln_q, ln_mlp, ln_out; query, key, value, out
            + (d * 4 * d + 4 * d) + (4 * d * d + d) + d * e  # MLP; projection (no bias)
            + dense + (d * 4 + 4)  # box head: hidden, out
        )  # fmt: skip
    return want


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_abstract_state(path):
    config = _load(path)
    with pytest.raises(AttributeError):
        config.not_a_key = 1  # locked: typos are errors
    model = build_model(from_config(config))  # paper configs: no tokenizer file needed for shapes
    mesh = sharding.make_mesh(config.mesh)
    _, shapes = abstract_state(config, model, make_optimizer(config.optim, config.num_steps), mesh)
    got = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in shapes.params.items()}
    assert got == expected_params(config)


# The CLOC paper's training setup (arXiv 2410.02746v2, /work/shared/PAPERS.md): variant -> image size, and
# batch 32,768, 439,087 steps, T5 tokenizer (32,000 pieces) lowercased into 77 tokens, b1 0.9, b2 0.98, peak lr 5e-4, 2k
# warmup, cosine, wd 0.2; negatives filtered above text similarity 0.9, M = 4 regions, lambda = 1.0 x share.
PAPER_IMAGE_SIZES = {"b16": ("B/16", 224), "l14": ("L/14", 336), "h14": ("H/14", 336)}


@pytest.mark.parametrize("name", sorted(PAPER_IMAGE_SIZES))
def test_paper_settings(name):
    c = _load(os.path.join(ROOT, "configs", f"cloc_{name}.py"))
    variant, size = PAPER_IMAGE_SIZES[name]
    assert (c.model.image.variant, c.image_size) == (variant, size)
    # 224 / 16 = 14 and 336 / 14 = 24 tokens a side: the position embeddings are learned at that grid.
    side = {224: 14, 336: 24}[size]
    assert build_model(from_config(c)).image.spec.posemb_grid == side
    assert (c.batch_size, c.num_steps) == (32_768, 439_087)
    assert c.tokenizer.context_length == 77 and c.tokenizer.lowercase and c.model.text.vocab_size == 32_000
    assert (c.optim.b1, c.optim.b2, c.optim.lr, c.optim.weight_decay) == (0.9, 0.98, 5e-4, 0.2)
    lr = schedule(c.optim, c.num_steps, c.optim.lr)
    # Linear warmup from 0 to the peak 5e-4 at step 2,000 (half of it at step 1,000), then cosine to 0 at the
    # last step: halfway through the decay (step 2,000 + 437,087 / 2) it is 5e-4 x (1 + cos(pi / 2)) / 2.
    assert float(lr(0)) == 0.0 and float(lr(1000)) == pytest.approx(2.5e-4, rel=1e-6)
    assert float(lr(2000)) == pytest.approx(5e-4, rel=1e-6)
    assert float(lr(2000 + 437_087 / 2)) == pytest.approx(2.5e-4, rel=1e-4)
    assert float(lr(c.num_steps)) == pytest.approx(0.0, abs=1e-12)
    r = c.region_loss
    assert (r.filter_threshold, r.weight, r.grounding, c.data.max_regions) == (0.9, 1.0, "l2", 4)


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


def test_a_umg_step_builds_without_its_data(monkeypatch):
    """The abstract state and the train step open no data source: the tag vocabulary, the one constant a UMG
    step takes from the data, is passed in (here 5 made-up tags), and the batch contract carries its size."""
    from cloc_jax.data import sources
    from cloc_jax.train import aot
    from tests.conftest import tiny_config

    monkeypatch.setattr(sources, "from_spec", lambda *a, **k: pytest.fail("a data source was opened"))
    config = tiny_config("umg_tiny", **{"data.train": "", "data.heldout": "", "mesh.data": 1})
    tags = np.ones((5, config.tokenizer.region_context_length), np.int32)
    lowered, _ = aot.lower_step(config, jax.devices()[:1], tags)
    assert "tensor<16x5xf32>" in lowered.as_text()  # image_tags [B, T]


def test_a_paper_config_lowers_without_its_tokenizer_file():
    """The pod's step is traced from the config alone (AOT needs no vocabulary file and no data)."""
    from cloc_jax.train import aot

    config = _load(os.path.join(ROOT, "configs", "cloc_l14.py"), "batch_size=8")
    lowered, _ = aot.lower_step(config, jax.devices())
    assert lowered.cost_analysis()["flops"] > 0
