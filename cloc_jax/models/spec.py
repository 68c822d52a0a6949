"""Model specs: what determines a model's parameters and meaning (model config, image size, tokenizer), and
the one function that builds a model from one. Checkpoints, exports and imported weights all carry a spec."""

import filecmp
import json
import os

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


# Keys that change only how a model runs (memory, speed, batch layout), not its parameters or what they
# compute: a run resumes with other values (with the mesh, which is not in the spec at all).
LAYOUT_KEYS = ("model.remat", "model.dtype", "model.attention", "tokenizer.region_pack_length")


def spec_mismatch(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """First differing key of two nested specs, outside `ignore`, as `key: saved != current`, or None."""
    saved, current = _flat(saved), _flat(current)
    for key in sorted(set(saved) | set(current)):
        if key not in ignore and saved.get(key) != current.get(key):
            return f"{key}: {saved.get(key)!r} != {current.get(key)!r}"
    return None


def build_model_from_spec(spec: dict, tokenizer: Tokenizer | None = None) -> Model:
    """Spec -> model. Without `tokenizer` its file is read only when the model takes its vocabulary size
    from it (`model.text.vocab_size` = 0), so a config that states the size compiles (AOT) without the file."""
    spec = with_defaults(spec)
    tok = spec["tokenizer"]
    if tok["region_context_length"] > tok["context_length"]:
        raise ValueError(
            f"tokenizer.region_context_length={tok['region_context_length']} exceeds "
            f"tokenizer.context_length={tok['context_length']}"
        )
    pack = tok["region_pack_length"]
    if 0 < pack < tok["region_context_length"]:
        raise ValueError(
            f"tokenizer.region_pack_length={pack} is shorter than one region text "
            f"(region_context_length={tok['region_context_length']}); use 0 (no packing) or more"
        )
    vocab = spec["model"]["text"]["vocab_size"] or (tokenizer or tokenizers.from_spec(tok)).padded_vocab_size
    return build_model(ml_collections.ConfigDict(spec["model"]), spec["image_size"], vocab, tok["context_length"], pack)


def build_from_spec(spec: dict) -> tuple[Tokenizer, Model]:
    """Spec -> (tokenizer, model): training, export, loading and imports all build models here."""
    tokenizer = tokenizers.from_spec(with_defaults(spec)["tokenizer"])
    model = build_model_from_spec(spec, tokenizer)
    if tokenizer.vocab_size > model.text.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but model.text.vocab_size={model.text.vocab_size}: "
            "set model.text.vocab_size=0 (the tokenizer's size) or the tokenizer's size"
        )
    return tokenizer, model


# Keys that belong to how a run trains, not to what the weights mean: a run started from a checkpoint keeps
# its own (a CLOC run adds its region heads to an imported CLIP; it may scan, remat or cast differently).
TRAINING_KEYS = (
    "model.region_extractor",
    "model.dtype",
    "model.scan",
    "model.remat",
    "model.attention",
    "model.max_logit_scale",
    "model.image.cluster_ratio",
    "model.image.cluster_layer",
    "model.image.cluster_unfold",
    "model.image.cluster_spatial",
    "model.image.cluster_knn",
    "model.image.adapter_dim",
    "tokenizer.region_context_length",
    "tokenizer.region_pack_length",
)


def _same_files(a: str, b: str) -> bool:
    """Two vocabulary paths (files or folders) with the same contents."""
    if not (a and b and os.path.exists(a) and os.path.exists(b)):
        return False
    if os.path.isdir(a) != os.path.isdir(b):
        return False
    if not os.path.isdir(a):
        return filecmp.cmp(a, b, shallow=False)
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(_same_files(os.path.join(a, n), os.path.join(b, n)) for n in names)


def adopt_architecture(config: ml_collections.ConfigDict, spec: dict, source: str) -> None:
    """Sets `config`'s architecture keys (model and tokenizer, not image_size) to those of the checkpoint
    `spec` it starts from. A key the config sets to something else than both the default and the
    checkpoint is a one-line error naming it: the config asks for another model than the weights are."""
    defaults, saved = _flat(default_spec()), _flat(with_defaults(spec))
    current = _flat(model_spec(config))
    for key, value in saved.items():
        if key == "image_size" or key in TRAINING_KEYS or current.get(key) == value:
            continue
        if key == "tokenizer.path" and _same_files(current.get(key), value):
            continue  # the same vocabulary in another place (an export keeps a copy)
        if current.get(key) != defaults.get(key):
            raise ValueError(
                f"init_from={source}: {key}={current.get(key)!r} disagrees with the checkpoint's {value!r} "
                "(architecture keys come from the checkpoint; drop the override)"
            )
        *path, last = key.split(".")
        target = config
        for part in path:
            target = target[part]
        target[last] = tuple(value) if isinstance(value, list) else value
    context = config.tokenizer.context_length
    if config.tokenizer.region_context_length > context:
        config.tokenizer.region_context_length = context
