"""Model specs: what determines a model's parameters and meaning (model config, image size, tokenizer), and
the one function that builds a model from one. Checkpoints, exports and imported weights all carry a spec."""

import json

import flax
import ml_collections

from cloc_jax import tokenizers
from cloc_jax.config import base_config
from cloc_jax.models.cloc import Model, build_model
from cloc_jax.tokenizers import Tokenizer


def _flat(tree: dict) -> dict:
    return flax.traverse_util.flatten_dict(tree, sep=".")


def model_spec(config: ml_collections.ConfigDict) -> dict:
    """What determines the parameters' shapes and meaning; nothing about training. JSON-normalised (tuples
    become lists), so a spec read back from a file compares equal."""
    spec = dict(model=config.model.to_dict(), image_size=config.image_size, tokenizer=config.tokenizer.to_dict())
    return json.loads(json.dumps(spec))


def default_spec() -> dict:
    return model_spec(base_config())


def with_defaults(spec: dict) -> dict:
    """A spec saved before an option existed gets that option's default, which keeps the old behaviour,
    so older checkpoints and exports still resume and load."""
    return flax.traverse_util.unflatten_dict({**_flat(default_spec()), **_flat(spec)}, sep=".")


def spec_mismatch(saved: dict, current: dict) -> str | None:
    """First differing key of two nested specs, as `key: saved != current`, or None."""
    saved, current = _flat(saved), _flat(current)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key}: {saved.get(key)!r} != {current.get(key)!r}"
    return None


def build_from_spec(spec: dict) -> tuple[Tokenizer, Model]:
    """Spec -> (tokenizer, model): training, export, loading and imports all build models here."""
    spec = with_defaults(spec)
    if spec["tokenizer"]["region_context_length"] > spec["tokenizer"]["context_length"]:
        raise ValueError(
            f"tokenizer.region_context_length={spec['tokenizer']['region_context_length']} exceeds "
            f"tokenizer.context_length={spec['tokenizer']['context_length']}"
        )
    pack = spec["tokenizer"]["region_pack_length"]
    if 0 < pack < spec["tokenizer"]["region_context_length"]:
        raise ValueError(
            f"tokenizer.region_pack_length={pack} is shorter than one region text "
            f"(region_context_length={spec['tokenizer']['region_context_length']}); use 0 (no packing) or more"
        )
    tokenizer = tokenizers.from_spec(spec["tokenizer"])
    model_config = ml_collections.ConfigDict(spec["model"])
    context = spec["tokenizer"]["context_length"]
    return tokenizer, build_model(model_config, spec["image_size"], tokenizer.padded_vocab_size, context, pack)
