"""Inference on trained parameters: the object evaluators use and `cloc_jax.load` returns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cloc_jax.models.cloc import Model
from cloc_jax.tokenizers import Tokenizer, tokenize


class Encoder:
    """Jitted `encode_image` / `encode_text` for a model and its parameters.

    Images are [B, H, W, 3] floats in [-1, 1]; texts are strings or token ids [B, L].
    Both return unit-norm embeddings [B, E] as numpy arrays.
    """

    def __init__(self, model: Model, params, tokenizer: Tokenizer, context_length: int, axis_rules=()):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.context_length, self.axis_rules = context_length, tuple(axis_rules)
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Model.encode_image)[0])
        self._text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=Model.encode_text))

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return tokenize(self.tokenizer, list(texts), self.context_length)

    def encode_image(self, images) -> np.ndarray:
        with nn.logical_axis_rules(self.axis_rules):
            return np.asarray(self._image(self.params, jnp.asarray(images)))

    def encode_text(self, texts) -> np.ndarray:
        tokens = texts if isinstance(texts, np.ndarray | jax.Array) else self.tokenize(texts)
        with nn.logical_axis_rules(self.axis_rules):
            return np.asarray(self._text(self.params, jnp.asarray(tokens)))
