"""Tiny models saved as exports, for the evaluation tests (random weights: the tests compare paths, not
quality)."""

import flax.linen as nn
import jax

from cloc_jax.models.build import build, init_params
from cloc_jax.models.spec import from_config
from cloc_jax.weights.native import write_export
from tests.conftest import tiny_config


def write_tiny_export(out: str, name: str = "cloc_tiny", seed: int = 0) -> str:
    spec = from_config(tiny_config(name))
    params = nn.unbox(init_params(build(spec), spec, jax.random.key(seed)))
    return write_export(spec, params, out)
