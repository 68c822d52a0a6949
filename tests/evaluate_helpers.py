"""Tiny models saved as exports, for the evaluation tests (random weights: the tests compare paths, not
quality)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax.export import write_export
from cloc_jax.models.spec import build_model_from_spec, model_spec
from tests.conftest import tiny_config


def write_tiny_export(out: str, name: str = "cloc_tiny", seed: int = 0) -> str:
    spec = model_spec(tiny_config(name))
    model = build_model_from_spec(spec)
    side, context = spec["image_size"], spec["tokenizer"]["context_length"]
    inputs = dict(images=jnp.zeros((1, side, side, 3)), tokens=jnp.zeros((1, context), jnp.int32))
    if model.region_extractor != "none":
        inputs.update(boxes=jnp.full((1, 1, 4), 0.5), region_tokens=jnp.zeros((1, 1, context), jnp.int32))
    params = nn.unbox(model.init(jax.random.key(seed), **inputs)["params"])
    return write_export(spec, params, out)
