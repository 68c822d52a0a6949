"""open_clip's timm towers (EVA-02-CLIP, PE-Core) against open_clip and timm themselves: tiny models of the
families' real definitions (tests/convert/timm_fixtures.py), every parameter perturbed: embeddings, logits and
intermediate features at two resolutions, scanned and unrolled; exports back to open_clip; our table of the real
names against timm's own models; bad folders as one-line errors."""

import dataclasses
import json
import os

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import cloc_jax  # noqa: E402
from cloc_jax import weights as convert  # noqa: E402
from cloc_jax.convert import convert as convert_to  # noqa: E402
from cloc_jax.models.spec import ImageSpec  # noqa: E402
from cloc_jax.weights import open_clip as oc  # noqa: E402
from cloc_jax.weights import timm_towers  # noqa: E402
from tests.convert import timm_fixtures as tf  # noqa: E402

TOL = 1e-4
TEXTS = ["a photo of a cat", "Two DOGS &amp; a bird!", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> its hub folder, saved once per module."""
    return {name: tf.save(str(tmp_path_factory.mktemp(name)), name) for name in tf.TINY}


def _images(side: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, side, side, 3)).astype(np.float32)


def _reference(model, name: str, images: np.ndarray) -> dict:
    """open_clip's outputs for these images: embeddings, logits and the tokens after each block (class token
    first), at the images' resolution (timm's set_input_size resamples the position embedding and the rotary
    grid, for good: pass a fresh model)."""
    model.visual.trunk.set_input_size(img_size=images.shape[1])
    pixels = tf.pixels(images, name)
    with torch.no_grad():
        image, text = model.encode_image(pixels, normalize=True), model.encode_text(open_clip.tokenize(TEXTS), True)
        blocks = model.visual.trunk.forward_intermediates(
            pixels, return_prefix_tokens=True, intermediates_only=True, output_fmt="NLC"
        )
        logits = (model.logit_scale.exp() * image @ text.T).numpy()
    features = [torch.cat([prefix, tokens], 1).numpy() for tokens, prefix in blocks]
    return dict(image=image.numpy(), text=text.numpy(), logits=logits, features=features)


def _errors(encoder, want: dict, images: np.ndarray) -> dict:
    errors = {
        "image": np.abs(encoder.encode_image(images) - want["image"]).max(),
        "text": np.abs(encoder.encode_text(TEXTS) - want["text"]).max(),
        "logits": np.abs(encoder.logits(images, TEXTS) - want["logits"]).max(),
    }
    for i, features in enumerate(want["features"]):
        errors[f"features[{i + 1}]"] = np.abs(encoder.image_features(images, layer=i + 1) - features).max()
    return errors


# EVA-02 and PE scanned and unrolled; PE's blocks with layer scale scanned
@pytest.mark.parametrize(
    "name, scan", [("eva02", True), ("eva02", False), ("pe", True), ("pe", False), ("pe_ls", True)]
)
def test_matches_open_clip_at_two_resolutions(folders, name, scan):
    directory = folders[name]
    encoder = cloc_jax.load(f"open_clip:{directory}", scan=scan)
    for side in (32, 48):  # 48: position embeddings resized bicubically, rotary positions on the new grid
        images = _images(side)
        errors = _errors(encoder, _reference(tf.build(name), name, images), images)
        print(name, f"scan={scan}", f"{side} px", {k: f"{v:.1e}" for k, v in errors.items()})
        assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", list(tf.TINY))
def test_export_round_trips(folders, name, tmp_path):
    """open_clip -> our export -> --to=open_clip: open_clip's create_model("local-dir:...") computes what the
    original computed; import -> export -> import is bit-identical."""
    directory = folders[name]
    first = convert.read(f"open_clip:{directory}")
    export = convert_to(f"open_clip:{directory}", str(tmp_path / "export"))
    again = convert.read(export)
    unrolled = first.in_layout(scan=False)
    assert unrolled.keys() == again.in_layout(scan=False).keys()
    for key, value in again.in_layout(scan=False).items():
        np.testing.assert_array_equal(unrolled[key], value, err_msg=key)
    out = convert_to(export, str(tmp_path / "open_clip"), to="open_clip")
    written = open_clip.create_model("local-dir:" + out).eval()
    images = _images(32)
    want, have = _reference(tf.build(name), name, images), _reference(written, name, images)
    for key in ("image", "text", "logits"):
        np.testing.assert_allclose(have[key], want[key], atol=1e-6, err_msg=key)
    third = convert.read(f"open_clip:{out}").in_layout(scan=False)
    for key, value in unrolled.items():
        np.testing.assert_array_equal(third[key], value, err_msg=key)
    with pytest.raises(ValueError, match=r"^model\.image\.\w+=.* has no transformers equivalent"):
        convert_to(export, str(tmp_path / "hf"), to="hf")  # no transformers class has these towers


@pytest.mark.parametrize("name", sorted(n for n in timm_towers.TOWERS if "tiny_test" not in n))
def test_table_matches_timm(name):
    """Every real timm name we read: the state dict our spec implies is the one timm's own model has (built on
    the meta device), and the rotary grid, offset, order and pool heads are timm's."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=512, global_pool=timm_towers.POOLS[timm_towers.TOWERS[name].family])
    family, image, _ = timm_towers.image_spec(timm_towers.vision_config(name), "test")
    image = {**dataclasses.asdict(ImageSpec()), **image}
    have = {f"visual.trunk.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    assert have == timm_towers.torch_shapes(image, 512)
    rope = model.rope
    assert tuple(rope.ref_feat_shape) == (image["rope_grid"],) * 2
    assert rope.grid_offset == image["rope_offset"]
    assert rope.grid_indexing == {"yx": "ij", "xy": "xy"}[image["rope_order"]]
    assert not rope.rotate_half and model.blocks[0].norm1.eps == image["ln_eps"]
    if family == "pe_core":
        assert model.attn_pool.num_heads == image["map_heads"] and model.num_prefix_tokens == 1


def _folder_with(tmp_path, name: str, edit) -> str:
    directory = tf.save(str(tmp_path / "bad"), name)
    path = os.path.join(directory, oc.CONFIG)
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return directory


def test_bad_folders_are_one_line(tmp_path):
    def rename(config):
        config["model_cfg"]["vision_cfg"]["timm_model_name"] = "eva02_enormous_patch14_clip_224"

    with pytest.raises(ValueError, match=r"timm_model_name='eva02_enormous_patch14_clip_224' is not a timm tower"):
        convert.read(f"open_clip:{_folder_with(tmp_path / 'a', 'eva02', rename)}")

    def pool(config):
        config["model_cfg"]["vision_cfg"]["timm_pool"] = "avg"

    with pytest.raises(ValueError, match=r"timm_pool='avg'.*timm_pool='map'"):
        convert.read(f"open_clip:{_folder_with(tmp_path / 'b', 'pe', pool)}")
    state = tf.build("eva02").state_dict()
    bias = state.pop("visual.trunk.blocks.1.attn.q_proj.bias")
    directory = tf.save(str(tmp_path / "c"), "eva02", state=state)
    with pytest.raises(ValueError, match=r"open_clip_model.safetensors: missing parameter visual.trunk.blocks.1"):
        convert.read(f"open_clip:{directory}")
    state["visual.trunk.blocks.1.attn.q_proj.bias"] = bias
    state["visual.trunk.rope.pos_embed"] = torch.zeros(16, 32)  # a rotary table: recomputed, never read
    directory = tf.save(str(tmp_path / "d"), "eva02", state=state)
    with pytest.raises(ValueError, match=r"unexpected parameter visual.trunk.rope.pos_embed"):
        convert.read(f"open_clip:{directory}")
    state.pop("visual.trunk.rope.pos_embed")
    state["visual.trunk.blocks.0.mlp.fc1_g.weight"] = torch.zeros(171, 64)
    directory = tf.save(str(tmp_path / "e"), "eva02", state=state)
    with pytest.raises(ValueError, match=r"mlp.fc1_g.weight has shape \(171, 64\), the architecture needs \(170, 64\)"):
        convert.read(f"open_clip:{directory}")
