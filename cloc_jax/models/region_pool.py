"""RoIAlign with torchvision's semantics, as two small interpolation matrices and einsums.

Bilinear sampling is separable: a sample at (y, x) weighs feature row h by max(0, 1 - |y - h|) and
column w by max(0, 1 - |x - w|). Averaging the s x s samples of an output bin therefore equals
A_y[p, h] F[h, w] A_x[q, w] with A_y the mean of the row weights of the bin's s sample rows. No gathers,
no per-box loops, no scatter in the backward: the matmuls run on the MXU and shard like any einsum.
"""

import jax
import jax.numpy as jnp


def _axis_weights(start: jax.Array, size: jax.Array, bins: int, sampling_ratio: int, length: int) -> jax.Array:
    """start, size [B, M] in feature pixels -> averaged sampling weights [B, M, bins, length].

    torchvision: a sample outside [-1, length] contributes zero; otherwise it is clamped into
    [0, length - 1] before interpolating (so a sample in [-1, 0) reads row 0)."""
    step = size / bins
    offsets = jnp.arange(bins)[:, None] + (jnp.arange(sampling_ratio)[None, :] + 0.5) / sampling_ratio
    pos = start[..., None, None] + offsets * step[..., None, None]  # [B, M, bins, s]
    inside = (pos >= -1.0) & (pos <= length)
    pos = jnp.clip(pos, 0.0, length - 1)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(pos[..., None] - jnp.arange(length)))  # [B, M, bins, s, length]
    return jnp.mean(jnp.where(inside[..., None], weights, 0.0), axis=-2)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
    mask: jax.Array | None = None,
) -> jax.Array:
    """features [B, H, W, C], boxes [B, M, 4] (x1, y1, x2, y2 in input pixels) -> [B, M, h, w, C].

    Boxes are multiplied by `spatial_scale` to reach feature pixels; `aligned` shifts them by half a
    pixel (torchvision's `aligned=True`). `sampling_ratio` samples per bin and axis must be fixed
    (torchvision's adaptive -1 would make shapes depend on the boxes). Boxes where `mask` [B, M] is
    False give zeros and pass no gradient to the features.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"roi_align output_size must be positive, got {output_size}")
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align sampling_ratio must be a positive integer (static shapes), got {sampling_ratio}")
    if features.ndim != 4:
        raise ValueError(f"roi_align features must be [B, H, W, C], got shape {features.shape}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"roi_align boxes must be [B={features.shape[0]}, M, 4], got shape {boxes.shape}")
    _, height, width, _ = features.shape
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[..., i].astype(jnp.float32) * spatial_scale - offset for i in range(4))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # torchvision's legacy behaviour: rois are at least one pixel
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    wy = _axis_weights(y1, roi_h, out_h, sampling_ratio, height)  # [B, M, out_h, H]
    wx = _axis_weights(x1, roi_w, out_w, sampling_ratio, width)  # [B, M, out_w, W]
    if mask is not None:
        wy = jnp.where(mask[..., None, None], wy, 0.0)
    wy, wx = wy.astype(features.dtype), wx.astype(features.dtype)
    columns = jnp.einsum("bmqw,bhwc->bmhqc", wx, features)  # [B, M, H, out_w, C]
    return jnp.einsum("bmph,bmhqc->bmpqc", wy, columns)
