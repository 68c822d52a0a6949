"""Box-aware transforms: property tests (hypothesis) that a box frames the same content after the transform
as before, and that images from the wild decode or are skipped with a reason."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cloc_jax.data import preprocess, transforms
from tests.data import fixtures

SIZE = 64
MARGIN = 2.5  # output pixels: how far bicubic resampling may smear an edge


@st.composite
def image_with_box(draw):
    """A black h x w image with one white pixel-aligned rectangle (at least 4 px a side); its box
    normalised xyxy. (1-pixel images have their own test.)"""
    h, w = draw(st.integers(8, 160)), draw(st.integers(8, 160))
    x0, y0 = draw(st.integers(0, w - 4)), draw(st.integers(0, h - 4))
    x1, y1 = draw(st.integers(x0 + 4, w)), draw(st.integers(y0 + 4, h))
    image = np.zeros((h, w, 3), np.uint8)
    image[y0:y1, x0:x1] = 255
    return image, np.array([[x0 / w, y0 / h, x1 / w, y1 / h]], np.float32)


def assert_box_frames_the_white_pixels(image: np.ndarray, box: np.ndarray):
    """Every bright pixel lies inside the box (+ margin); the box's interior (- margin) is bright."""
    side_y, side_x = image.shape[:2]
    x0, y0, x1, y1 = box * [side_x, side_y, side_x, side_y]
    bright = image[..., 0] > 127
    ys, xs = np.nonzero(bright)
    if len(xs):
        assert xs.min() + 0.5 >= x0 - MARGIN and xs.max() + 0.5 <= x1 + MARGIN
        assert ys.min() + 0.5 >= y0 - MARGIN and ys.max() + 0.5 <= y1 + MARGIN
    rows = slice(int(np.ceil(y0 + MARGIN)), max(0, int(np.floor(y1 - MARGIN))))
    cols = slice(int(np.ceil(x0 + MARGIN)), max(0, int(np.floor(x1 - MARGIN))))
    assert bright[rows, cols].all()


@settings(max_examples=60, deadline=None)
@given(image_with_box())
def test_resize_pad_moves_boxes_with_the_content(case):
    image, boxes = case
    out, moved = transforms.resize_pad(image, boxes, SIZE)
    assert out.shape == (SIZE, SIZE, 3)
    assert (moved >= 0).all() and (moved <= 1 + 1e-6).all()
    assert_box_frames_the_white_pixels(out, moved[0])


@settings(max_examples=60, deadline=None)
@given(image_with_box(), st.integers(0, 2**31), st.floats(0.1, 1.0))
def test_random_resized_crop_keeps_boxes_inside_and_on_their_content(case, seed, low):
    image, boxes = case
    out, moved, _ = transforms.random_resized_crop(image, boxes, SIZE, np.random.default_rng(seed), (low, 1.0))
    clipped, keep = transforms.clip_boxes(moved, min_visible=0.3)
    assert out.shape == (SIZE, SIZE, 3)
    assert (clipped >= 0).all() and (clipped <= 1).all()
    if keep[0]:
        assert_box_frames_the_white_pixels(out, clipped[0])
    else:  # dropped: it really lost most of itself (or all) to the crop
        area = lambda b: np.prod(np.clip(b[2:] - b[:2], 0, None))  # noqa: E731
        assert area(clipped[0]) < 0.3 * area(moved[0]) + 1e-6 or (clipped[0, 2:] - clipped[0, :2] < 1e-3).any()


@settings(max_examples=30, deadline=None)
@given(image_with_box())
def test_hflip_is_exact_and_an_involution(case):
    image, boxes = case
    flipped, moved = transforms.hflip(image, boxes)
    assert_box_frames_the_white_pixels(np.ascontiguousarray(flipped), moved[0])
    again, back = transforms.hflip(flipped, moved)
    np.testing.assert_array_equal(again, image)
    np.testing.assert_allclose(back, boxes, atol=1e-6)


def test_left_and_right_swap_in_texts():
    assert transforms.swap_left_right("the cup left of the Right plate, leftmost") == (
        "the cup right of the Left plate, rightmost"
    )
    assert transforms.swap_left_right("a bright light") == "a bright light"  # whole words only
    assert transforms.mentions_left_right(["x", "on the left"]) and not transforms.mentions_left_right(["copyright"])


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P", "I;16", "1"])
def test_every_colour_mode_decodes_to_rgb(mode):
    image = Image.new("RGB", (7, 5), (200, 30, 60)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out = preprocess.decode(fixtures.encoded(image, fmt), draft=224)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8


def test_alpha_is_composited_over_grey():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent red
    np.testing.assert_array_equal(preprocess.decode(fixtures.encoded(image, "PNG"), draft=224), 128)


def test_broken_and_extreme_images():
    jpeg = fixtures.encoded(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    for data, reason in [
        (jpeg[: len(jpeg) // 2], "corrupt_image"),
        (b"definitely not an image", "corrupt_image"),
        (b"", "missing_image"),
        (fixtures.huge_png_header(), "too_large"),  # 20,000 x 20,000 PNG: refused before decoding
    ]:
        with pytest.raises(transforms.BadImage) as error:
            preprocess.decode(data, draft=224)
        assert error.value.reason == reason
    assert preprocess.decode(fixtures.encoded(Image.new("RGB", (1, 1)), "PNG"), draft=224).shape == (1, 1, 3)
    huge = fixtures.encoded(Image.new("L", (20_000, 20_000), 90), "JPEG")  # decoded at 1/8 scale
    assert preprocess.decode(huge, draft=224).shape == (2500, 2500, 3)


def test_one_pixel_image_resizes_to_the_full_canvas():
    out, boxes = transforms.resize_pad(np.full((1, 1, 3), 77, np.uint8), np.array([[0, 0, 1, 1]], np.float32), 8)
    assert (out == 77).all()
    np.testing.assert_allclose(boxes, [[0, 0, 1, 1]])
