"""CLIP-only twin of cloc_tiny.py (region losses off): the baseline CLOC is measured against."""

import os

from cloc_jax.config import clip_twin, load_config_file


def get_config(arg: str | None = None):
    return clip_twin(load_config_file(os.path.join(os.path.dirname(__file__), "cloc_tiny.py"), arg))
