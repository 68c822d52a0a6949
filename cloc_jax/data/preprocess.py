"""One decode-and-resize path from an image file to a model's input, applying the model's own rule.

`evaluate`, `predict`, `embed` and `Encoder.load_images` all come through here, so a checkpoint sees the pixels its
own library would give it (`models.spec.PreprocessSpec`, read from the checkpoint's processor files):
- decoding applies the EXIF orientation (a phone photo tagged "rotate 90" is upright), decodes JPEGs in full
  (a DCT-scaled draft only for a JPEG over MAX_PIXELS, which could not load otherwise), and converts colour
  modes as the reference processors do: palette and grayscale to RGB, CMYK by PIL's conversion, transparency
  composited over the rule's background (transformers: white; CLOC: grey) or dropped (open_clip and big_vision
  keep the stored colours). 16-bit images are scaled by 1/257 (65535 -> 255):
  a deliberate difference, where PIL's own conversion clips them at 255 (mostly white).
- resizing: "letterbox" (long side -> S, zero padding right and bottom: CLOC's, which keeps every box and pixel),
  "center_crop" (short side -> S / crop_fraction, then the centre S x S: CLIP, open_clip), "squash" (both sides ->
  S: SigLIP). PIL's filters antialias as transformers and torchvision on PIL images do; `antialias=False` is
  tf.image.resize's point-sampled bilinear (big_vision).
`Geometry` maps boxes between the image and the model's input.
"""

import io
import math

import numpy as np
from PIL import Image, ImageOps

from cloc_jax.data import transforms
from cloc_jax.data.transforms import MAX_PIXELS, BadImage
from cloc_jax.models.spec import PreprocessSpec

RESIZE_RULES = ("letterbox", "center_crop", "squash")
INTERPOLATIONS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}
ALPHA = {"grey": 128, "white": 255, "drop": None}  # the background transparent pixels are composited over
CROP_OFFSETS = ("floor", "round")  # (H - S) / 2 floored (transformers) or rounded half to even (torchvision)


def check(rule: PreprocessSpec) -> None:
    """One line for a rule no path can apply."""
    for key, value, allowed in (
        ("resize", rule.resize, RESIZE_RULES),
        ("interpolation", rule.interpolation, tuple(INTERPOLATIONS)),
        ("alpha", rule.alpha, tuple(ALPHA)),
        ("crop_offset", rule.crop_offset, CROP_OFFSETS),
    ):
        if value not in allowed:
            raise ValueError(f"preprocess.{key}={value!r}; choose one of {allowed}")
    if not 0 < rule.crop_fraction <= 1:
        raise ValueError(f"preprocess.crop_fraction={rule.crop_fraction} must be in (0, 1]")
    if not rule.antialias and (rule.interpolation != "bilinear" or rule.resize != "squash"):
        raise ValueError("preprocess.antialias=False is tf.image.resize's bilinear squash: set those too")


def open_image(data: bytes, draft: int = 0) -> Image.Image:
    """Encoded bytes -> a decoded PIL image, upright (EXIF orientation applied). BadImage("missing_image" |
    "corrupt_image" | "too_large") for what cannot be used. `draft` > 0 (training's speed): a JPEG decodes at the
    smallest power-of-two scale still >= draft a side (DCT scaling), so a 20,000 px photo costs what a 2,500 px
    one does; without it a JPEG decodes in full unless it is over MAX_PIXELS (then at the largest scale that
    fits); other formats over MAX_PIXELS are refused before their pixels are decoded."""
    if not data:
        raise BadImage("missing_image")
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if image.format == "JPEG" and draft:
            image.draft("RGB", (draft, draft))
        elif image.format == "JPEG" and w * h > MAX_PIXELS:
            scale = next((s for s in (2, 4, 8) if (w // s) * (h // s) <= MAX_PIXELS), 8)
            image.draft("RGB", (w // scale, h // scale))
        if image.size[0] * image.size[1] > MAX_PIXELS:
            raise BadImage("too_large")
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # (not in place, it copies every image, rotated or not)
        return image
    except BadImage:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        raise BadImage("corrupt_image") from error


def pixels_to_uint8(array: np.ndarray) -> np.ndarray:
    """Decoded pixels of any dtype -> uint8: floats in [0, 1] are scaled by 255, other values in [0, 255]
    rounded. NaN or inf pixels, or values outside [0, 255], raise BadImage (a cast would make them black)."""
    if array.dtype == np.uint8:
        return array
    values = np.asarray(array, np.float64)
    if not np.isfinite(values).all():
        raise BadImage("nonfinite_pixels")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise BadImage("pixels_out_of_range")
    if np.issubdtype(array.dtype, np.floating) and (not values.size or values.max() <= 1.0):
        values = values * 255.0
    return np.round(values).astype(np.uint8)


def to_rgb(image: Image.Image, alpha: str = "grey") -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3] (module docstring: how each mode converts)."""
    if image.mode in ("I;16", "I;16B", "I;16L"):
        image = Image.fromarray(np.round(np.asarray(image, np.float64) / 257).astype(np.uint8))
    elif image.mode in ("I", "F"):
        array = np.asarray(image, np.float64)
        if not np.isfinite(array).all():  # a float TIFF can hold NaN or inf
            raise BadImage("nonfinite_pixels")
        image = Image.fromarray(np.round(np.clip(array, 0, 255)).astype(np.uint8))
    transparent = "A" in image.getbands() or image.info.get("transparency") is not None
    if transparent and ALPHA[alpha] is not None:
        grey = ALPHA[alpha]
        background = Image.new("RGBA", image.size, (grey, grey, grey, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def decode(data, alpha: str = "grey", draft: int = 0) -> np.ndarray:
    """Encoded bytes (or an array, as some sources hold images) -> upright uint8 [H, W, 3] (`open_image`,
    `to_rgb`). Raises BadImage (the reasons above, "nonfinite_pixels", "pixels_out_of_range")."""
    if isinstance(data, np.ndarray):
        array = data if data.ndim == 3 else data[..., None]
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        return np.ascontiguousarray(pixels_to_uint8(array[..., :3]))
    return to_rgb(open_image(data, draft), alpha)


class Geometry:
    """Where an [H, W] image lands in the model's S x S input: boxes normalised to one <-> the other."""

    def __init__(self, height: int, width: int, size: int, scale_xy: tuple[float, float], offset_xy=(0.0, 0.0)):
        self.height, self.width, self.size = height, width, size
        self.scale_xy, self.offset_xy = tuple(map(float, scale_xy)), tuple(map(float, offset_xy))
        self._scale = np.array([*scale_xy, *scale_xy], np.float32)  # input pixels per image pixel
        self._offset = np.array([*offset_xy, *offset_xy], np.float32)  # input pixel where the image's corner lands

    def to_model(self, boxes: np.ndarray) -> np.ndarray:
        """[N, 4] normalised to the image -> normalised to the model's input (may leave it under a crop)."""
        image_px = np.array([self.width, self.height, self.width, self.height], np.float32)
        return (boxes * image_px * self._scale - self._offset) / self.size

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """[N, 4] normalised to the model's input -> normalised to the image, clipped to it."""
        image_px = np.array([self.width, self.height, self.width, self.height], np.float32)
        return np.clip((boxes * self.size + self._offset) / self._scale / image_px, 0, 1)

    @classmethod
    def letterbox(cls, height: int, width: int, size: int) -> "Geometry":
        """The long side resized to `size`, padding right and bottom (`transforms.resize_pad`)."""
        nh, nw = transforms.letterbox_size(height, width, size)
        return cls(height, width, size, (nw / width, nh / height))

    def as_array(self) -> np.ndarray:
        """float64 [4]: (scale x, scale y, offset x, offset y), how a batch row carries its geometry."""
        return np.array([*self.scale_xy, *self.offset_xy], np.float64)

    def source_pixels(self, count: int, axis: int) -> np.ndarray:
        """int [count]: for each input pixel along x (axis 1) or y (axis 0), the image pixel whose area holds its
        centre; -1 where the input shows no image (a letterbox's padding). PIL's nearest-neighbour rule."""
        scale, offset, extent = self.scale_xy[1 - axis], self.offset_xy[1 - axis], (self.height, self.width)[axis]
        index = np.floor((np.arange(count) + 0.5 + offset) / scale).astype(np.int64)
        return np.where((index >= 0) & (index < extent), index, -1)

    def warp(self, labels: np.ndarray, fill) -> np.ndarray:
        """Per-pixel labels of the image [H, W, ...] (masks, a label map) -> [S, S, ...], pixel-aligned with the
        model's input: each input pixel takes the label of the image pixel under its centre, `fill` on padding."""
        rows, cols = self.source_pixels(self.size, 0), self.source_pixels(self.size, 1)
        out = labels[np.maximum(rows, 0)][:, np.maximum(cols, 0)]
        outside = (rows < 0)[:, None] | (cols < 0)[None, :]
        out[outside] = fill
        return out


def _resize(image: np.ndarray, height: int, width: int, rule: PreprocessSpec) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    if rule.antialias:
        return transforms.resize(image, height, width, INTERPOLATIONS[rule.interpolation])
    return _point_bilinear(image, height, width)


def _linear_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] point-sampled linear interpolation, half-pixel centres, edges clamped."""
    src = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    out = np.zeros((size_out, size_in))
    np.add.at(out, (np.arange(size_out), low), 1 - (src - low))
    np.add.at(out, (np.arange(size_out), high), src - low)
    return out


def _point_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = _linear_weights(image.shape[0], height), _linear_weights(image.shape[1], width)
    out = np.tensordot(rows, image.astype(np.float64), axes=(1, 0))  # [height, W, 3]
    out = np.tensordot(cols, out, axes=(1, 1)).transpose(1, 0, 2)  # [height, width, 3]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def model_input(image: np.ndarray, rule: PreprocessSpec, size: int) -> tuple[np.ndarray, Geometry]:
    """uint8 [H, W, 3] -> (uint8 [S, S, 3], its Geometry) by the rule's resize."""
    check(rule)
    h, w = image.shape[:2]
    if rule.resize == "squash":
        return _resize(image, size, size, rule), Geometry(h, w, size, (size / w, size / h))
    if rule.resize == "letterbox":  # (check: letterboxing always antialiases)
        out, _ = transforms.resize_pad(image, np.zeros((0, 4), np.float32), size, INTERPOLATIONS[rule.interpolation])
        return out, Geometry.letterbox(h, w, size)
    short = math.floor(size / rule.crop_fraction + 1e-6)  # timm's scale size: floor(S / crop_pct)
    nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    resized = _resize(image, nh, nw, rule)  # both sides >= S: crop_fraction <= 1
    offset = (lambda d: d // 2) if rule.crop_offset == "floor" else (lambda d: round(d / 2.0))
    top, left = offset(nh - size), offset(nw - size)
    geometry = Geometry(h, w, size, (nw / w, nh / h), (left, top))
    return resized[top : top + size, left : left + size], geometry


def region_rule(rule: PreprocessSpec) -> PreprocessSpec:
    """The geometry region-level work uses (boxes, grounding, segmentation): every box and pixel kept. A squash
    keeps them (and is what the model saw); a crop would cut boxes off, so it becomes a letterbox."""
    if rule.resize == "squash":
        return rule
    return PreprocessSpec(resize="letterbox", interpolation=rule.interpolation, alpha=rule.alpha)


def protocol(rule: PreprocessSpec, size: int) -> str:
    """The geometry as a benchmark record states it: "center_crop 224 (crop 0.875, bicubic)"."""
    how = f"{rule.interpolation}" + ("" if rule.antialias else ", not antialiased")
    crop = f"crop {rule.crop_fraction:g}, " if rule.resize == "center_crop" else ""
    return f"{rule.resize} {size} ({crop}{how})"
