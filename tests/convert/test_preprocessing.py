"""Imported checkpoints see their own library's pixels (issue: numbers comparable with the published ones).

For tiny random transformers CLIP and SigLIP and open_clip CLIP at 224 px, on a real photo cut to several aspect
ratios (and one stored sideways with an EXIF rotation): `Encoder.load_images` gives the pixels the library's own
preprocessing gives (within one grey level) and the embeddings agree to cosine >= 0.9999; zero-shot on a small
ImageFolder-like fixture predicts what the library's pipeline predicts; processor settings survive export."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cloc_jax  # noqa: E402
from cloc_jax.convert import convert  # noqa: E402
from cloc_jax.models.spec import PreprocessSpec, from_dict  # noqa: E402
from tests.convert import reference  # noqa: E402
from tests.data.test_preprocess import photos, reference_image  # noqa: E402

MIN_COSINE = 0.9999


def _check(encoder, name: str, want_pixels: np.ndarray | None, want_embedding: np.ndarray, data: bytes) -> float:
    """Our pixels within one grey level of the library's (`None`: not compared); -> the embeddings' cosine."""
    ours = encoder.load_images([data])
    if want_pixels is not None:
        assert np.abs((ours[0] + 1) * 127.5 - want_pixels).max() <= 1.0 + 1e-3, name
    z = encoder.encode_image(ours)[0]
    return float(z @ (want_embedding / np.linalg.norm(want_embedding)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return reference.save_clip(str(tmp_path_factory.mktemp("clip224")), side=224)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return reference.save_siglip(str(tmp_path_factory.mktemp("siglip224")), side=224)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_transformers_pixels_and_embeddings(family, backend, clip_dir, siglip_dir):
    """transformers' PIL backend gives our pixels exactly; its torchvision backend (its default) resizes tensors
    and differs by up to one grey level, more where it enlarges (the 180 px photo: a few pixels, compared by
    embedding only)."""
    from transformers import AutoImageProcessor, AutoModel

    directory = clip_dir if family == "clip" else siglip_dir
    encoder = cloc_jax.load(f"hf:{directory}")
    want_rule = "center_crop" if family == "clip" else "squash"
    assert encoder.spec.preprocess.resize == want_rule and encoder.spec.preprocess.alpha == "white"
    processor = AutoImageProcessor.from_pretrained(directory, backend=backend)
    model = AutoModel.from_pretrained(directory).eval()
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    cosines = []
    for name, data in photos().items():
        pixels = processor(images=reference_image(data), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            want = model.get_image_features(pixel_values=pixels)
            want = getattr(want, "pooler_output", want)[0].numpy()
        grey = (pixels[0].numpy().transpose(1, 2, 0) * std + mean) * 255
        compared = None if backend == "torchvision" and name == "small" else grey
        cosines.append(_check(encoder, f"{family}/{backend}/{name}", compared, want, data))
    print(f"hf {family} ({backend}): minimum cosine {min(cosines):.7f}")
    assert min(cosines) >= MIN_COSINE, cosines


def test_open_clip_pixels_and_embeddings(tmp_path):
    from tests.convert.test_open_clip import TOWERS, _build, _save

    cfg = dict(embed_dim=16, quick_gelu=True, **TOWERS)
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], image_size=224, patch_size=32)
    folder = _save(tmp_path / "oc224", cfg, {"interpolation": "bicubic", "resize_mode": "shortest"})
    encoder = cloc_jax.load(f"open_clip:{folder}")
    assert encoder.spec.preprocess == PreprocessSpec(resize="center_crop", crop_offset="round", alpha="drop")
    import open_clip

    model = _build(cfg)
    transform = open_clip.transform.image_transform(224, is_train=False, interpolation="bicubic")
    mean, std = np.array(open_clip.constants.OPENAI_DATASET_MEAN), np.array(open_clip.constants.OPENAI_DATASET_STD)
    cosines = []
    for name, data in photos().items():
        pixels = transform(reference_image(data))[None]
        with torch.no_grad():
            want = model.encode_image(pixels)[0].numpy()
        grey = (pixels[0].numpy().transpose(1, 2, 0) * std + mean) * 255
        cosines.append(_check(encoder, f"open_clip/{name}", grey, want, data))
    print(f"open_clip: minimum cosine {min(cosines):.7f}")
    assert min(cosines) >= MIN_COSINE, cosines


def test_zero_shot_on_an_image_folder_predicts_what_transformers_predicts(clip_dir, tmp_path):
    """class/*.jpg folders of photos; every image's top class by our pipeline = by transformers' own."""
    from transformers import CLIPModel, CLIPProcessor

    classes = ["a portrait", "a landscape", "a square photo"]
    files = {}
    for i, (name, data) in enumerate(photos().items()):
        folder = tmp_path / classes[i % 3].replace(" ", "_")
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(data)
        files[str(folder / f"{name}.jpg")] = data
    encoder = cloc_jax.load(f"hf:{clip_dir}")
    ours = encoder.logits(encoder.load_images(list(files)), classes).argmax(-1)
    processor, model = CLIPProcessor.from_pretrained(clip_dir), CLIPModel.from_pretrained(clip_dir).eval()
    images = [reference_image(data) for data in files.values()]
    with torch.no_grad():
        inputs = processor(text=classes, images=images, return_tensors="pt", padding=True)
        theirs = model(**inputs).logits_per_image.argmax(-1).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_processor_settings_survive_import_and_export(tmp_path):
    """A bilinear processor with a 0.875 crop (short side 256 for 224) is read into the spec and written back."""
    from transformers import CLIPImageProcessor

    source = reference.save_clip(str(tmp_path / "clip"), side=224)
    CLIPImageProcessor(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=2
    ).save_pretrained(source)
    rule = cloc_jax.load(f"hf:{source}").spec.preprocess
    assert (rule.resize, rule.crop_fraction, rule.interpolation) == ("center_crop", 0.875, "bilinear")
    export = convert(f"hf:{source}", str(tmp_path / "export"))
    out = convert(export, str(tmp_path / "hf"), to="hf")
    with open(os.path.join(out, "preprocessor_config.json")) as f:
        written = json.load(f)
    assert (written["size"], written["crop_size"], written["resample"]) == (
        {"shortest_edge": 256},
        {"height": 224, "width": 224},
        2,
    )


def test_open_clip_preprocess_cfg_survives_import_and_export(tmp_path):
    """A squash with bilinear resampling in preprocess_cfg is read into the spec and written back."""
    from tests.convert.test_open_clip import TOWERS, _save

    cfg = dict(embed_dim=16, quick_gelu=True, **TOWERS)
    folder = _save(tmp_path / "oc", cfg, {"interpolation": "bilinear", "resize_mode": "squash"})
    rule = cloc_jax.load(f"open_clip:{folder}").spec.preprocess
    assert (rule.resize, rule.interpolation) == ("squash", "bilinear")
    out = convert(convert(f"open_clip:{folder}", str(tmp_path / "export")), str(tmp_path / "back"), to="open_clip")
    with open(os.path.join(out, "open_clip_config.json")) as f:
        written = json.load(f)["preprocess_cfg"]
    assert (written["resize_mode"], written["interpolation"]) == ("squash", "bilinear")


def test_files_written_before_specs_held_preprocessing():
    """No `preprocess` key: a model trained here keeps CLOC's letterbox (what every model got then); an import
    whose family shows in its spec gets that family's rule."""
    native = from_dict(dict(model=dict(image=dict(variant="mu/8"))))
    assert native.preprocess == PreprocessSpec()
    clip = from_dict(dict(model=dict(image=dict(variant="hf/16"), loss="softmax")))
    assert (clip.preprocess.resize, clip.preprocess.alpha) == ("center_crop", "white")
    siglip = from_dict(dict(model=dict(image=dict(variant="hf/16"), loss="sigmoid")))
    assert (siglip.preprocess.resize, siglip.preprocess.interpolation) == ("squash", "bicubic")
    big_vision = from_dict(dict(model=dict(image=dict(variant="B/16", posemb_resize="zoom"), loss="sigmoid")))
    assert big_vision.preprocess.antialias is False
    assert from_dict(dict(model=dict(image=dict(variant="open_clip/32")))).preprocess.crop_offset == "round"
