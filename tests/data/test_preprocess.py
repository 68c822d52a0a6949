"""The one decode-and-resize path against the libraries' own preprocessing: transformers' CLIP and SigLIP image
processors and open_clip's transform, on a real photo (matplotlib's sample) cut to several aspect ratios, with and
without an EXIF rotation; the point-sampled bilinear against torch; boxes through each geometry."""

import io
import os

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageOps

from cloc_jax.data import preprocess
from cloc_jax.data.transforms import BadImage
from cloc_jax.models.spec import PreprocessSpec

PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
ORIENTATION = 0x0112


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[ORIENTATION] = orientation
    image.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def photos() -> dict[str, bytes]:
    """name -> JPEG bytes: the 512 x 600 photo, a 512 x 300 landscape, a 400 x 400 square, a small 180 x 250
    portrait, and the landscape stored sideways with EXIF orientation 6 ("rotate 90 clockwise to show")."""
    photo = Image.open(PHOTO).convert("RGB")
    landscape = photo.crop((0, 100, 512, 400))
    out = {
        "portrait": _jpeg(photo),
        "landscape": _jpeg(landscape),
        "square": _jpeg(photo.crop((56, 100, 456, 500))),
        "small": _jpeg(photo.crop((150, 50, 330, 300))),
        "landscape_exif": _jpeg(landscape.transpose(Image.Transpose.ROTATE_90), orientation=6),
    }
    return out


def reference_image(data: bytes) -> Image.Image:
    """What a user hands the reference libraries: the file opened upright (transformers' load_image does this)."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def test_exif_orientation_is_applied():
    data = photos()
    upright, sideways = preprocess.decode(data["landscape"]), preprocess.decode(data["landscape_exif"])
    assert upright.shape == sideways.shape == (300, 512, 3)
    assert np.abs(upright.astype(int) - sideways.astype(int)).mean() < 2  # JPEG noise only
    raw = np.asarray(Image.open(io.BytesIO(data["landscape_exif"])).convert("RGB"))
    assert raw.shape == (512, 300, 3)  # as stored: sideways


@pytest.mark.parametrize("name", ["portrait", "landscape", "square", "small", "landscape_exif"])
@pytest.mark.parametrize("fraction", [1.0, 0.875])
def test_center_crop_equals_transformers_clip_processor(name, fraction):
    """transformers' PIL backend (the torchvision one, its default, is compared in tests/convert)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = 224
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": int(size / fraction)}, crop_size={"height": size, "width": size}, do_normalize=False
    )
    data = photos()[name]
    want = processor(images=reference_image(data), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) * 255
    rule = PreprocessSpec(resize="center_crop", crop_fraction=fraction, interpolation="bicubic", alpha="white")
    got, _ = preprocess.model_input(preprocess.decode(data, rule.alpha), rule, size)
    assert got.shape == (size, size, 3)
    assert np.abs(got - want).max() <= 1.0 + 1e-4, name


@pytest.mark.parametrize("name", ["portrait", "landscape", "small", "landscape_exif"])
@pytest.mark.parametrize("interpolation, resample", [("bilinear", 2), ("bicubic", 3)])
def test_squash_equals_transformers_siglip_processor(name, interpolation, resample):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(size={"height": 224, "width": 224}, resample=resample, do_normalize=False)
    data = photos()[name]
    want = processor(images=reference_image(data), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) * 255
    rule = PreprocessSpec(resize="squash", interpolation=interpolation, alpha="white")
    got, _ = preprocess.model_input(preprocess.decode(data, rule.alpha), rule, 224)
    assert np.abs(got - want).max() <= 1.0 + 1e-4, name


@pytest.mark.parametrize("name", ["portrait", "landscape", "small", "landscape_exif"])
def test_center_crop_equals_open_clips_transform(name):
    import open_clip.transform as oct

    transform = oct.image_transform(224, is_train=False, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bicubic")
    data = photos()[name]
    want = transform(reference_image(data)).numpy().transpose(1, 2, 0) * 255
    rule = PreprocessSpec(resize="center_crop", interpolation="bicubic", crop_offset="round", alpha="drop")
    got, _ = preprocess.model_input(preprocess.decode(data, rule.alpha), rule, 224)
    assert np.abs(got - want).max() <= 1.0 + 1e-4, name


def test_point_sampled_bilinear_equals_torch_without_antialiasing():
    """big_vision's resize (tf.image.resize bilinear, half-pixel centres, no antialiasing) is torch's
    interpolate(bilinear, align_corners=False, antialias=False)."""
    import torch

    image = preprocess.decode(photos()["landscape"])
    rule = PreprocessSpec(resize="squash", interpolation="bilinear", antialias=False, alpha="drop")
    got, _ = preprocess.model_input(image, rule, 224)
    x = torch.tensor(image.transpose(2, 0, 1)[None], dtype=torch.float64)
    want = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    assert np.abs(got - want[0].numpy().transpose(1, 2, 0)).max() <= 0.5 + 1e-6


@pytest.mark.parametrize(
    "rule",
    [
        PreprocessSpec(resize="letterbox"),
        PreprocessSpec(resize="squash", interpolation="bilinear"),
        PreprocessSpec(resize="center_crop", crop_fraction=0.875),
    ],
    ids=["letterbox", "squash", "center_crop"],
)
def test_boxes_frame_the_same_pixels_in_the_image_and_the_input(rule):
    """A box round-trips image -> input -> image; a bright square drawn in the image is where the mapped box says."""
    image = np.zeros((300, 500, 3), np.uint8)
    image[100:160, 200:300] = 255
    box = np.array([[200 / 500, 100 / 300, 300 / 500, 160 / 300]], np.float32)
    pixels, geometry = preprocess.model_input(image, rule, 112)
    mapped = geometry.to_model(box)[0] * 112
    x0, y0, x1, y1 = np.round(mapped).astype(int)
    assert pixels[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].min() > 200  # inside: the square
    bright = np.argwhere(pixels[..., 0] > 128)
    np.testing.assert_allclose(bright.min(0), [y0, x0], atol=1)
    np.testing.assert_allclose(bright.max(0) + 1, [y1, x1], atol=1)
    np.testing.assert_allclose(geometry.to_image(geometry.to_model(box)), box, atol=1e-5)


def test_colour_modes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert (preprocess.to_rgb(rgba, "white") == 255).all()
    assert (preprocess.to_rgb(rgba, "grey") == 128).all()
    assert (preprocess.to_rgb(rgba, "drop") == [255, 0, 0]).all()  # open_clip's convert("RGB")
    sixteen = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert (preprocess.to_rgb(sixteen) == 255).all()  # 1/257, not PIL's clip of 65535 to 255 ... of 257 to 255
    assert (preprocess.to_rgb(Image.fromarray(np.full((2, 2), 257, np.uint16))) == 1).all()
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert (preprocess.to_rgb(cmyk) == np.asarray(cmyk.convert("RGB"))).all()
    with pytest.raises(BadImage, match="corrupt_image"):
        preprocess.decode(b"not an image")
    with pytest.raises(ValueError, match=r"preprocess\.resize='zoom'"):
        preprocess.model_input(np.zeros((4, 4, 3), np.uint8), PreprocessSpec(resize="zoom"), 4)
