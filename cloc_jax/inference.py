"""Inference on trained parameters: the object evaluators use and `cloc_jax.load` returns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cloc_jax.data import preprocess
from cloc_jax.models.cloc import Model
from cloc_jax.models.spec import Spec
from cloc_jax.tokenizers import Tokenizer, tokenize


def class_embeddings(encode_text, class_names, templates) -> np.ndarray:
    """CLIP's prompt ensemble: each class the normalised mean of its prompts' unit embeddings over the templates
    ("a photo of a {}.") -> [C, E]. `encode_text`: strings -> unit embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    z = encode_text(prompts).reshape(len(class_names), len(templates), -1).mean(1)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _to_pixels(dense: jax.Array, size: tuple[int, int], pixels: bool) -> jax.Array:
    """[B, h, w, E] -> itself, or bilinearly resized to [B, *size, E] and renormalised."""
    if not pixels:
        return dense
    up = jax.image.resize(dense, (dense.shape[0], *size, dense.shape[-1]), "bilinear")
    return up / jnp.linalg.norm(up, axis=-1, keepdims=True).clip(1e-6)


class Encoder:
    """Jitted `encode_image` / `encode_text` for a model and its parameters.

    Images are [B, S, S, 3] floats in [-1, 1] (S = spec.image_size); texts are strings or token ids [B, L];
    boxes are [B, M, 4] xyxy normalised to [0, 1]. Embeddings are unit-norm numpy arrays. Regions and grounding
    go through the model's region head (`can_ground` says whether it has a box head).
    """

    def __init__(self, model: Model, params, tokenizer: Tokenizer, spec: Spec, axis_rules=()):
        self.model, self.params, self.tokenizer, self.spec = model, params, tokenizer, spec
        self.context_length, self.image_size = spec.tokenizer.context_length, spec.image_size
        self.axis_rules = tuple(axis_rules)
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Model.encode_image))
        self._text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=Model.encode_text))
        self._regions = jax.jit(lambda p, x, b: model.apply({"params": p}, x, b, method=Model.encode_regions))
        self._ground = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, method=Model.ground))
        self._dense = jax.jit(
            lambda p, x, pixels: _to_pixels(model.apply({"params": p}, x, method=Model.dense), x.shape[1:3], pixels),
            static_argnums=2,
        )
        self._logit_params = jax.jit(lambda p: model.apply({"params": p}, method=Model.logit_params))
        self._features = {}  # hidden-state depth -> jitted truncated tower

    def load_images(self, files) -> np.ndarray:
        """Image files (paths or encoded bytes) -> [B, S, S, 3] in [-1, 1] by the model's own preprocessing
        (`spec.preprocess`: the pixels its library would give it; EXIF orientation applied), for `encode_image`."""
        rule, out = self.spec.preprocess, []
        for file in files:
            if isinstance(file, str):
                with open(file, "rb") as f:
                    file = f.read()
            out.append(preprocess.model_input(preprocess.decode(file, rule.alpha), rule, self.image_size)[0])
        return np.stack(out).astype(np.float32) / 127.5 - 1.0

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return tokenize(self.tokenizer, list(texts), self.context_length)

    def encode_image(self, images) -> np.ndarray:
        with nn.logical_axis_rules(self.axis_rules):
            return np.asarray(self._image(self.params, jnp.asarray(images)))

    def encode_text(self, texts) -> np.ndarray:
        tokens = texts if isinstance(texts, np.ndarray | jax.Array) else self.tokenize(texts)
        with nn.logical_axis_rules(self.axis_rules):
            return np.asarray(self._text(self.params, jnp.asarray(tokens)))

    def encode_classes(self, class_names, templates=("{}",)) -> np.ndarray:
        """Class names -> [C, E] unit embeddings, each the prompt ensemble of its templates (`class_embeddings`)."""
        return class_embeddings(self.encode_text, class_names, templates)

    def image_features(self, images, layer: int = -2) -> np.ndarray:
        """[B, H, W, 3] in [-1, 1] -> the image tower's hidden states [B, T, width] after `layer` blocks, indexed
        as transformers' `hidden_states[layer]` (0 = the embeddings, -1 = the last block's output, -2 = what
        LLaVA-style multimodal LLMs read); the class token comes first where the family has one."""
        depth = self.model.image.size().depth
        if not -(depth + 1) <= layer <= depth:
            raise ValueError(f"layer={layer}: the image tower has hidden states 0..{depth} (or -1..-{depth + 1})")
        k = layer % (depth + 1)
        if k not in self._features:
            truncated = self.model.image.clone(hidden_layers=k, parent=None)
            self._features[k] = jax.jit(lambda p, x: truncated.apply({"params": p}, x))
        params = self.params["image"]
        if self.model.image.tower.scan:
            sliced = jax.tree.map(lambda a: a[:k], params["encoder"]["blocks"])
            params = {**params, "encoder": {**params["encoder"], "blocks": sliced}}
        with nn.logical_axis_rules(self.axis_rules):
            return np.asarray(self._features[k](params, jnp.asarray(images)))

    def logit_params(self) -> tuple[float, float]:
        """(scale, bias) turning cosines into logits: CLIP's temperature; SigLIP's bias (0 for CLIP)."""
        scale, bias = self._logit_params(self.params)
        return float(scale), 0.0 if bias is None else float(bias)

    def logits(self, images, texts) -> np.ndarray:
        """[B, H, W, 3] + N texts -> [B, N] image-text logits as the source library computes them:
        scale x cosine (+ SigLIP's bias)."""
        scale, bias = self.logit_params()
        return scale * self.encode_image(images) @ self.encode_text(texts).T + bias

    def encode_regions(self, images, boxes) -> np.ndarray:
        """[B, H, W, 3] + [B, M, 4] -> [B, M, E]: one image forward serves every box, through the region head
        (the Prompter, RoIAlign, or a CLIP-only model's own head pooling inside each box)."""
        with nn.logical_axis_rules(self.axis_rules):
            return np.asarray(self._regions(self.params, jnp.asarray(images), jnp.asarray(boxes, jnp.float32)))

    def dense(self, images, pixels: bool = False) -> np.ndarray:
        """[B, S, S, 3] -> unit embeddings in the joint space of every token's cell [B, h, w, E] (h = S / patch), by
        the region head; `pixels`: bilinearly upsampled to every input pixel [B, S, S, E] (renormalised), on device.
        Compare with `encode_text` / `encode_classes` for open-vocabulary segmentation."""
        with nn.logical_axis_rules(self.axis_rules):
            return np.asarray(self._dense(self.params, jnp.asarray(images), pixels))

    @property
    def can_ground(self) -> bool:
        """Whether the region head turns texts into boxes (`ground`)."""
        return self.model.head.can_ground

    def ground(self, images, texts) -> np.ndarray:
        """[B, H, W, 3] + texts ([B][M] strings or [B, M, L] tokens) -> boxes [B, M, 4] xyxy in [0, 1]."""
        if not self.can_ground:
            raise ValueError(f"ground needs a box head; this model's region head is {self.model.head.description}")
        if not isinstance(texts, np.ndarray | jax.Array):
            texts = np.stack([self.tokenize(row) for row in texts])
        with nn.logical_axis_rules(self.axis_rules):
            return np.asarray(self._ground(self.params, jnp.asarray(images), jnp.asarray(texts)))
