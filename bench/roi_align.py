"""RoIAlign forward + backward: the einsum version against a straightforward gather-based JAX version.

    python bench/roi_align.py --batch=16 --grid=14 --width=768 --regions=4

Both compute torchvision's RoIAlign (the test suite checks the einsum one against a loop; here the
gather one is checked against it before timing). Prints one JSON line with both times and the ratio.
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags
from common import median_seconds

from cloc_jax.models.region_pool import roi_align

_BATCH = flags.DEFINE_integer("batch", 16, "images")
_GRID = flags.DEFINE_integer("grid", 14, "token grid side")
_WIDTH = flags.DEFINE_integer("width", 768, "channels")
_REGIONS = flags.DEFINE_integer("regions", 4, "boxes per image")
_OUT = flags.DEFINE_integer("output_size", 7, "bins per side")


def gather_roi_align(features, boxes, output_size, sampling_ratio=2):
    """Sample points -> 4 gathered neighbours -> bilinear weights -> mean (aligned=True, scale 1)."""
    _, height, width, _ = features.shape
    x1, y1, x2, y2 = (boxes[..., i] - 0.5 for i in range(4))
    steps = (jnp.arange(output_size)[:, None] + (jnp.arange(sampling_ratio) + 0.5) / sampling_ratio).reshape(-1)
    ys = y1[..., None] + steps * ((y2 - y1) / output_size)[..., None]  # [B, M, S]
    xs = x1[..., None] + steps * ((x2 - x1) / output_size)[..., None]
    y, x = ys[..., :, None], xs[..., None, :]  # [B, M, S, 1], [B, M, 1, S]
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    y, x = jnp.clip(y, 0, height - 1), jnp.clip(x, 0, width - 1)
    y0, x0 = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
    y1i, x1i = jnp.minimum(y0 + 1, height - 1), jnp.minimum(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    b = jnp.arange(features.shape[0])[:, None, None, None]

    def at(yy, xx):
        return features[b, jnp.broadcast_to(yy, inside.shape), jnp.broadcast_to(xx, inside.shape)]

    value = (
        ((1 - ly) * (1 - lx))[..., None] * at(y0, x0)
        + ((1 - ly) * lx)[..., None] * at(y0, x1i)
        + (ly * (1 - lx))[..., None] * at(y1i, x0)
        + (ly * lx)[..., None] * at(y1i, x1i)
    )
    value = jnp.where(inside[..., None], value, 0.0)  # [B, M, S, S, C]
    bsz, m, _, _, c = value.shape
    value = value.reshape(bsz, m, output_size, sampling_ratio, output_size, sampling_ratio, c)
    return value.mean(axis=(3, 5))


def main(argv):
    del argv
    key1, key2 = jax.random.split(jax.random.key(0))
    side = _GRID.value
    features = jax.random.normal(key1, (_BATCH.value, side, side, _WIDTH.value))
    corners = jax.random.uniform(key2, (_BATCH.value, _REGIONS.value, 2, 2), minval=-1, maxval=side + 1)
    boxes = jnp.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1)
    out = _OUT.value
    einsum_fn = jax.jit(jax.value_and_grad(lambda f: jnp.sum(roi_align(f, boxes, out) ** 2)))
    gather_fn = jax.jit(jax.value_and_grad(lambda f: jnp.sum(gather_roi_align(f, boxes, out) ** 2)))
    a, b = einsum_fn(features), gather_fn(features)
    assert jnp.allclose(a[0], b[0], rtol=1e-4) and jnp.allclose(a[1], b[1], atol=1e-3), "versions disagree"
    t_einsum = median_seconds(lambda: einsum_fn(features), 20)
    t_gather = median_seconds(lambda: gather_fn(features), 20)
    print(
        json.dumps(
            dict(
                shape=[_BATCH.value, side, side, _WIDTH.value],
                regions=_REGIONS.value,
                output_size=out,
                einsum_seconds=t_einsum,
                gather_seconds=t_gather,
                gather_over_einsum=t_gather / t_einsum,
            )
        )
    )


if __name__ == "__main__":
    app.run(main)
