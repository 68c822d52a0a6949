"""The training state: what a config builds (tokenizer, model, optimizer), its sharded shapes, a fresh
initialisation, and starting from pretrained weights. Nothing here opens a data source."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cloc_jax import sharding
from cloc_jax.config import set_dotted
from cloc_jax.models.build import build_with_tokenizer, init_params
from cloc_jax.models.cloc import Model
from cloc_jax.models.spec import architecture_overrides, from_config
from cloc_jax.models.vit import merge_clustered_encoder, split_clustered_encoder
from cloc_jax.optim import make_optimizer
from cloc_jax.tokenizers import Tokenizer
from cloc_jax.weights.layout import Weights


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_in_a_row: jax.Array  # steps skipped for a non-finite loss, gradient or update, up to now
    nonfinite_total: jax.Array


def build(config: ml_collections.ConfigDict) -> tuple[Tokenizer, Model, optax.GradientTransformation]:
    """Config -> (tokenizer, model, optimizer): the objects every entry point needs."""
    tokenizer, model = build_with_tokenizer(from_config(config))
    return tokenizer, model, make_optimizer(config.optim, config.num_steps)


def fresh_state(params, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 of `params`: the optimizer's initial state, no non-finite steps yet."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, tx.init(params), nonfinite_in_a_row=zero, nonfinite_total=zero)


def abstract_state(config, model: Model, tx: optax.GradientTransformation, mesh):
    """(init function, state shapes with their NamedShardings): parameters are born sharded."""
    spec = from_config(config)

    def init(rng):
        return fresh_state(init_params(model, spec, rng, regions=config.data.max_regions), tx)

    return sharded_init(init, mesh, config.axis_rules)


def sharded_init(init, mesh, rules):
    """`init(rng)` -> a state of boxed parameters -> (the same init unboxed, the state's shapes with the
    NamedShardings the logical axis `rules` give them on `mesh`)."""
    boxed = jax.eval_shape(lambda: init(jax.random.key(0)))  # traced: works for abstract (AOT) devices too
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    unboxed = lambda rng: nn.unbox(init(rng))  # noqa: E731
    shapes = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), sharding.unbox(boxed), shardings
    )
    return unboxed, shapes


def init_state(config, model: Model, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, Any]:
    """A freshly initialised, already-sharded TrainState, and its sharded shapes (for restoring)."""
    init, shapes = abstract_state(config, model, tx, mesh)
    state = jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, shapes))(jax.random.key(config.seed))
    return state, shapes


def adopt_architecture(config: ml_collections.ConfigDict, pretrained_spec, source: str) -> None:
    """Sets `config`'s architecture keys (model and tokenizer, not image_size) to those of the checkpoint it
    starts from (`spec.architecture_overrides`: a key the config sets otherwise is a one-line error)."""
    set_dotted(config, architecture_overrides(from_config(config), pretrained_spec, source))


def _depth(flat: dict, prefix: str, scan: bool) -> int:
    """How many blocks the stack under `prefix` holds in flat parameters (scanned: its leading axis)."""
    if scan:
        return next(v.shape[0] for k, v in flat.items() if k.startswith(prefix + "blocks/"))
    return len({k[len(prefix) :].split("/")[0] for k in flat if k.startswith(prefix + "block_")})


def init_from(state: TrainState, pretrained: Weights, scan: bool) -> TrainState:
    """Copies a checkpoint's parameters (`weights.read` of any `load` source: an export, hf:, open_clip:,
    big_vision:) into a fresh state, each array put straight from host memory onto its sharding (no
    device ever holds the whole model).

    Parameters the new model adds (Prompter, box head, adapters) keep their initialisation; a
    checkpoint parameter the new model lacks, or one with another shape, is an error. A model trained
    with token clustering can continue without it (its two encoder stacks become one), and one without with it."""
    loaded, source = pretrained.params, pretrained.source
    fresh = flax.traverse_util.flatten_dict(state.params, sep="/")
    scanned = pretrained.scanned
    if any("encoder_clustered" in k for k in loaded) and not any("encoder_clustered" in k for k in fresh):
        loaded = merge_clustered_encoder(loaded)  # trained with token clustering, continued without
    elif any("encoder_clustered" in k for k in fresh) and not any("encoder_clustered" in k for k in loaded):
        # started without token clustering, continued with it: the first blocks run before the clustering point
        unrolled = Weights(pretrained.spec, loaded, source, scanned=scanned).in_layout(False)
        loaded, scanned = split_clustered_encoder(unrolled, _depth(fresh, "image/encoder/", scan)), False
    loaded = Weights(pretrained.spec, loaded, source, scanned=scanned).in_layout(scan)
    if missing := sorted(set(loaded) - set(fresh)):
        raise ValueError(f"init_from={source}: the model has no parameter {missing[0]} (different model?)")
    for key, value in loaded.items():
        if value.shape != fresh[key].shape:
            raise ValueError(f"init_from={source}: {key} is {value.shape}, the model wants {fresh[key].shape}")
        fresh[key] = jax.device_put(np.asarray(value, fresh[key].dtype), fresh[key].sharding)
    print(f"Initialised {len(loaded)} of {len(fresh)} parameter arrays from {source}")
    return state.replace(params=flax.traverse_util.unflatten_dict(fresh, sep="/"))
