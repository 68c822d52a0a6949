"""Image tower forward + backward with token clustering (UMG-CLIP, r = 0.75) against none.

    python bench/clustering.py --variant=B/16 --image_size=224 --batch=8

Prints one JSON line: seconds per step for both and the speed-up (measured in one run).
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags
from common import median_seconds

from cloc_jax.models.build import tower_settings
from cloc_jax.models.spec import ImageSpec, ModelSpec
from cloc_jax.models.vit import ViT

_VARIANT = flags.DEFINE_string("variant", "B/16", "ViT variant")
_SIZE = flags.DEFINE_integer("image_size", 224, "pixels")
_BATCH = flags.DEFINE_integer("batch", 8, "images")
_RATIO = flags.DEFINE_float("ratio", 0.75, "fraction of tokens clustered away")
_LAYER = flags.DEFINE_integer("layer", 2, "blocks before clustering")
_UNFOLD = flags.DEFINE_string("unfold", "residual", "copy | residual (the umg configs': residual)")
_KNN = flags.DEFINE_integer("knn", 2, "neighbours of a token's density (the umg configs': 2)")


def step_fn(ratio: float):
    patch = int(_VARIANT.value.split("/")[1])
    image = ImageSpec(
        variant=_VARIANT.value,
        posemb_grid=_SIZE.value // patch,
        cluster_ratio=ratio,
        cluster_layer=_LAYER.value,
        cluster_unfold=_UNFOLD.value,
        cluster_knn=_KNN.value,
    )
    vit = ViT(image, tower_settings(ModelSpec()))
    images = jax.random.normal(jax.random.key(0), (_BATCH.value, _SIZE.value, _SIZE.value, 3))
    params = vit.init(jax.random.key(1), images)

    def loss(p):  # the pooled embedding and the (unfolded) grid both reach the loss, as in training
        embedding, grid, _ = vit.apply(p, images)
        return jnp.sum(embedding**2) + jnp.sum(grid[..., :1] ** 2)

    grad = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad(params))
    return lambda: grad(params)


def main(argv):
    del argv
    plain, clustered = step_fn(0.0), step_fn(_RATIO.value)
    t_plain, t_clustered = median_seconds(plain, 5), median_seconds(clustered, 5)
    print(
        json.dumps(
            dict(
                variant=_VARIANT.value,
                image_size=_SIZE.value,
                batch=_BATCH.value,
                ratio=_RATIO.value,
                cluster_layer=_LAYER.value,
                unfold=_UNFOLD.value,
                knn=_KNN.value,
                plain_seconds=t_plain,
                clustered_seconds=t_clustered,
                speedup=t_plain / t_clustered,
            )
        )
    )


if __name__ == "__main__":
    app.run(main)
