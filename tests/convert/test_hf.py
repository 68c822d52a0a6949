"""hf: CLIP and SigLIP checkpoints against transformers itself: embeddings, logits, hidden states, tokenizer
ids, position-embedding resizing, exports back to transformers, and bad folders as one-line errors."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cloc_jax  # noqa: E402
from cloc_jax import weights as convert  # noqa: E402
from cloc_jax.convert import convert as convert_to  # noqa: E402
from cloc_jax.weights import hf  # noqa: E402
from tests.convert import reference  # noqa: E402

TEXTS = ["a photo of a cat", "two dogs!", "A RED circle, left of the blue square.", ""]
TOL = 1e-4


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return reference.save_clip(str(tmp_path_factory.mktemp("clip")))  # OpenAI's quick_gelu


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return reference.save_siglip(str(tmp_path_factory.mktemp("siglip")))


def _images(n=2, side=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, side, side, 3)).astype(np.float32)


def _unit(x):
    x = x.numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(directory, family, images, texts):
    """transformers' own outputs: (image embeddings, text embeddings, logits [B, N], vision hidden states)."""
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    model = cls.from_pretrained(directory).eval()
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    pad = dict(padding="max_length", max_length=model.config.text_config.max_position_embeddings, truncation=True)
    ids = tok(texts, return_tensors="pt", **pad)
    pixels = reference.clip_pixels(images) if family == "clip" else reference.siglip_pixels(images)
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], pixel_values=pixels, output_hidden_states=True)
    hidden = [h.numpy() for h in out.vision_model_output.hidden_states]
    return _unit(out.image_embeds), _unit(out.text_embeds), out.logits_per_image.numpy(), hidden


def _compare(encoder, directory, family, images=None):
    images = _images() if images is None else images
    zimg, ztxt, logits, hidden = _reference(directory, family, images, TEXTS)
    errors = {
        "image": np.abs(encoder.encode_image(images) - zimg).max(),
        "text": np.abs(encoder.encode_text(TEXTS) - ztxt).max(),
        "logits": np.abs(encoder.logits(images, TEXTS) - logits).max(),
    }
    for layer in (-2, 0, -1):
        errors[f"hidden[{layer}]"] = np.abs(encoder.image_features(images, layer) - hidden[layer]).max()
    print(family, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL, errors
    return errors


@pytest.mark.parametrize("scan", [True, False])
def test_clip_matches_transformers(clip_dir, scan):
    encoder = cloc_jax.load(f"hf:{clip_dir}", scan=scan)
    assert encoder.spec.model.scan is scan
    _compare(encoder, clip_dir, "clip")


def test_clip_with_exact_gelu_matches_transformers(tmp_path):  # LAION's CLIPs
    directory = reference.save_clip(str(tmp_path), act="gelu")
    encoder = cloc_jax.load(f"hf:{directory}")
    assert encoder.spec.model.activation == "gelu"
    _compare(encoder, directory, "clip")


@pytest.mark.parametrize("scan", [True, False])
def test_siglip_matches_transformers(siglip_dir, scan):
    encoder = cloc_jax.load(f"hf:{siglip_dir}", scan=scan)
    _compare(encoder, siglip_dir, "siglip")
    # the learned scale and bias are loaded as they are (no clamp): SigLIP's scale is 10 x exp(noise) here
    state = transformers.SiglipModel.from_pretrained(siglip_dir).state_dict()
    scale, bias = encoder._logit_params(encoder.params)
    assert np.isclose(float(scale), state["logit_scale"].exp().item()) and np.isclose(
        float(bias), state["logit_bias"].item()
    )


def test_tokenizer_ids_equal_transformers(clip_dir, siglip_dir):
    rng = np.random.default_rng(0)
    pieces = [
        "a",
        "photo",
        "of",
        "CAT",
        "dogs",
        "!",
        "?!",
        "'s",
        "don't",
        "é",
        "ü",
        "漢字",
        "😀",
        "&amp;",
        "3.14",
        "  ",
        "-",
    ]
    texts = [" ".join(rng.choice(pieces, rng.integers(0, 12))) for _ in range(300)]
    texts += ["x " * 200, "word" * 100, "", "   "]
    for directory in (clip_dir, siglip_dir):
        encoder = cloc_jax.load(f"hf:{directory}")
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        context = encoder.context_length
        ours = encoder.tokenize(texts)
        for text, row in zip(texts, ours, strict=True):
            ids = tok(text, truncation=True, max_length=context)["input_ids"]
            np.testing.assert_array_equal(row[: len(ids)], ids, err_msg=text)
            assert (row[len(ids) :] == encoder.tokenizer.pad_id).all()
    assert encoder.tokenizer.pad_id == tok.pad_token_id  # SigLIP pads with its own pad token, which it reads


def test_position_embeddings_resize_as_transformers_interpolates(clip_dir, siglip_dir):
    images = _images(side=48)
    for directory, family in ((clip_dir, "clip"), (siglip_dir, "siglip")):
        encoder = cloc_jax.load(f"hf:{directory}")
        cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
        model = cls.from_pretrained(directory).eval()
        pixels = reference.clip_pixels(images) if family == "clip" else reference.siglip_pixels(images)
        with torch.no_grad():
            want = _unit(model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output)
        error = np.abs(encoder.encode_image(images) - want).max()
        print(family, "48 px from 32 px", f"{error:.2e}")
        assert error < TOL


def test_export_to_transformers_round_trip(clip_dir, siglip_dir, tmp_path):
    for directory, family in ((clip_dir, "clip"), (siglip_dir, "siglip")):
        export = write_export_of(f"hf:{directory}", tmp_path / f"{family}_export")
        out = str(tmp_path / f"{family}_hf")
        hf.write(convert.read(export), cloc_jax.load(export).tokenizer, out)
        _compare(cloc_jax.load(f"hf:{out}"), directory, family)  # transformers reads it: the source's outputs
        auto = transformers.AutoModel.from_pretrained(out)
        assert type(auto).__name__ == ("CLIPModel" if family == "clip" else "SiglipModel")
        vision_cls = transformers.CLIPVisionModel if family == "clip" else transformers.SiglipVisionModel
        vision = vision_cls.from_pretrained(out).eval()  # what a multimodal LLM loads
        images = _images()
        pixels = reference.clip_pixels(images) if family == "clip" else reference.siglip_pixels(images)
        with torch.no_grad():
            hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].numpy()
        assert np.abs(cloc_jax.load(f"hf:{directory}").image_features(images) - hidden).max() < TOL


def write_export_of(source, out):
    return convert_to(source, str(out))


def test_import_export_import_is_bit_identical(clip_dir, tmp_path):
    first = convert.read(f"hf:{clip_dir}")
    again = convert.read(write_export_of(f"hf:{clip_dir}", tmp_path / "export"))
    assert (first.scanned, again.scanned) == (False, True)  # read one block at a time; the export scans
    unrolled = first.in_layout(scan=False)
    assert unrolled.keys() == again.in_layout(scan=False).keys()
    for key, value in again.in_layout(scan=False).items():
        np.testing.assert_array_equal(unrolled[key], value, err_msg=key)
    out = str(tmp_path / "hf")
    hf.write(again, cloc_jax.load(str(tmp_path / "export")).tokenizer, out)
    third = convert.read(f"hf:{out}")
    for key, value in unrolled.items():
        np.testing.assert_array_equal(value, third.params[key], err_msg=key)


def _copy(directory, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(directory, out)
    return out


def _edit_weights(directory, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_bad_folders_are_one_line_errors(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        cloc_jax.load(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="is no known checkpoint"):
        cloc_jax.load(str(tmp_path / "nothing_here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"spec\.json"):
        cloc_jax.load(str(tmp_path / "empty"))

    d = _copy(clip_dir, tmp_path / "missing")
    _edit_weights(d, lambda s: s.pop("vision_model.post_layernorm.bias"))
    with pytest.raises(ValueError, match=r"missing parameter vision_model\.post_layernorm\.bias"):
        cloc_jax.load(f"hf:{d}")

    d = _copy(clip_dir, tmp_path / "extra")
    _edit_weights(d, lambda s: s.update({"vision_model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"model.safetensors: unexpected parameter vision_model\.extra\.weight"):
        cloc_jax.load(f"hf:{d}")

    d = _copy(clip_dir, tmp_path / "shape")
    _edit_weights(d, lambda s: s.update({"text_projection.weight": np.zeros((16, 31), np.float32)}))
    with pytest.raises(ValueError, match=r"model.safetensors: text/proj/kernel has shape \(31, 16\)"):
        cloc_jax.load(f"hf:{d}")

    d = _copy(clip_dir, tmp_path / "act")
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["vision_config"]["hidden_act"] = "relu"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"hidden_act='relu' is not supported"):
        cloc_jax.load(f"hf:{d}")


def test_architectures_transformers_cannot_express_are_named(clip_dir, tmp_path):
    weights = convert.read(f"hf:{clip_dir}")
    weights.spec = weights.spec.replace(**{"model.image.pool": "gap"})
    with pytest.raises(ValueError, match=r"model.image.pool='gap'"):
        hf.family_of(weights.spec)
    weights.spec = weights.spec.replace(**{"model.image.pool": "cls", "model.activation": "relu"})
    with pytest.raises(ValueError, match=r"model.activation='relu'"):
        hf.family_of(weights.spec)


def test_convert_command(clip_dir, tmp_path):
    import subprocess
    import sys

    export = convert_to(f"hf:{clip_dir}", str(tmp_path / "export"), scan=False)
    assert cloc_jax.load(export).spec.model.scan is False
    _compare(cloc_jax.load("hf:" + convert_to(export, str(tmp_path / "hf"), to="hf")), clip_dir, "clip")
    run = subprocess.run(
        [sys.executable, "-m", "cloc_jax.convert", f"--from={tmp_path}/nothing", f"--out={tmp_path}/x"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode != 0 and run.stderr.strip().splitlines()[-1].startswith("error: "), run.stderr
    assert "is no known checkpoint" in run.stderr.strip().splitlines()[-1]
