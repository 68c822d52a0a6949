"""Dense adaptation (UMG-CLIP's downstream recipe, FC-CLIP's setting): a pretrained model's backbone stays frozen,
Convpass adapters inside it train when `model.image.adapter_dim` > 0 (PET), and an open-vocabulary mask decoder
(`models/mask_decoder.py`) learns Mask2Former's set losses (`mask_losses.py`) on masked data: every region's
instance mask and one region per stuff class of the label map.

Parameters are {"backbone": the model's, "decoder": the decoder's}; `optim.trainable` = ("decoder", "adapter")
freezes the rest by optax masks. Without adapters the backbone's token grid is a constant of the step (no
backward pass through it). Class names are embedded once by the frozen text tower (prompt ensemble over
`dense.templates`); training scores the classes it may see (`seen_names`), evaluation any vocabulary.
Checkpoints, resumption, metrics and the mesh are the pretraining loop's (`checkpoint.py`, `metrics.py`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from cloc_jax import guards, sharding
from cloc_jax.checkpoint import Checkpoints
from cloc_jax.data import pipeline, sources
from cloc_jax.evals import dense as dense_eval
from cloc_jax.inference import Encoder
from cloc_jax.mask_losses import MaskLossWeights, decoder_loss
from cloc_jax.metrics import MetricWriter
from cloc_jax.models.build import build as build_model
from cloc_jax.models.build import init_params
from cloc_jax.models.cloc import Model
from cloc_jax.models.mask_decoder import MaskDecoder, backbone_grid, class_logits, make_decoder
from cloc_jax.models.spec import from_config
from cloc_jax.optim import make_optimizer
from cloc_jax.train.loop import pretrained_weights
from cloc_jax.train.state import TrainState, build, fresh_state, init_from, sharded_init
from cloc_jax.train.step import guarded_update


def seen_names(config: ml_collections.ConfigDict, classes) -> tuple[str, ...]:
    """The classes the decoder trains on: the training source's, less `dense.unseen_classes`."""
    unseen = set(config.dense.unseen_classes)
    return tuple(c for c in classes if c not in unseen)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How a batch's pixels become decoder targets: `remap` [C_all + 1] takes a label-map class to its index among
    the seen classes (-1: not trained; the last entry is for -1 labels), `stuff` the label-map classes that are one
    region each (not instances)."""

    remap: np.ndarray
    stuff: np.ndarray

    @classmethod
    def of(cls, config, classes) -> "TargetSpec":
        seen = seen_names(config, classes)
        remap = np.array([seen.index(c) if c in seen else -1 for c in classes] + [-1], np.int32)
        unknown = set(config.dense.stuff_classes) - set(classes)
        if unknown:
            raise ValueError(f"dense.stuff_classes {sorted(unknown)} are not classes of the training data")
        return cls(remap, np.array([classes.index(c) for c in config.dense.stuff_classes], np.int32))


def area_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in]: how much of each output cell each input pixel covers, over the cell's size (rows sum to
    1); exact area averaging for any ratio (a 14 px patch makes 3.5 input pixels a mask cell)."""
    edges = np.arange(size_out + 1) * size_in / size_out
    starts, ends = np.arange(size_in), np.arange(1, size_in + 1)
    overlap = np.minimum(ends[None], edges[1:, None]) - np.maximum(starts[None], edges[:-1, None])
    return (np.clip(overlap, 0, None) * size_out / size_in).astype(np.float32)


def _area(masks: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, G, S, T] in {0, 1} -> [B, G, h, w]: each cell's covered fraction."""
    rows, cols = area_weights(masks.shape[2], size[0]), area_weights(masks.shape[3], size[1])
    return jnp.einsum("hs,bgst,wt->bghw", rows, masks, cols)


def targets(batch: dict, spec: TargetSpec, size: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A masked batch -> (labels [B, G] seen-class indices, masks [B, G, h * w] in [0, 1], valid [B, G]) with
    G = M regions + K stuff classes."""
    remap = jnp.asarray(spec.remap)
    instances = _area(batch["region_masks"].astype(jnp.float32), size)
    labels = remap[jnp.where(batch["region_labels"] >= 0, batch["region_labels"], -1)]
    valid = batch["region_mask"] & batch["has_masks"][:, None] & (labels >= 0) & (instances.sum((2, 3)) > 0)
    stuff = jnp.asarray(spec.stuff)
    regions = _area((batch["semantic"][:, None] == stuff[None, :, None, None]).astype(jnp.float32), size)
    stuff_labels = jnp.broadcast_to(remap[stuff], (regions.shape[0], len(spec.stuff)))
    stuff_valid = batch["has_semantic"][:, None] & (stuff_labels >= 0) & (regions.sum((2, 3)) > 0)
    masks = jnp.concatenate([instances, regions], 1)
    return (
        jnp.concatenate([labels, stuff_labels], 1),
        masks.reshape(*masks.shape[:2], -1),
        jnp.concatenate([valid, stuff_valid], 1),
    )


def make_dense_step(config, model: Model, decoder: MaskDecoder, tx, text: np.ndarray, spec: TargetSpec):
    """-> step(state, batch) -> (state, metrics); `text` [C_seen, E] the seen classes' embeddings."""
    weights = MaskLossWeights(**config.dense.loss)

    def loss_fn(params, batch):
        out = decoder.apply({"params": params["decoder"]}, backbone_grid(model, params["backbone"], batch["image"]))
        layers, b, q, h, w = out["masks"].shape
        labels, masks, valid = targets(batch, spec, (h, w))
        logits = class_logits(out["classes"], out["void"], out["scale"], jnp.asarray(text))
        loss, metrics = decoder_loss(logits, out["masks"].reshape(layers, b, q, h * w), labels, masks, valid, weights)
        return loss, {**metrics, "targets_per_image": valid.sum(1).mean()}

    def step(state: TrainState, batch: dict):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new, guard = guarded_update(state, loss, grads, optax.apply_updates(state.params, updates), opt_state)
        return new, {**metrics, "loss": loss, **guard}

    return step


def example_batch(config: ml_collections.ConfigDict, n: int) -> dict:
    """Zeros shaped like a masked training batch of `n` images: what the dense step reads (`targets`)."""
    side, m = config.image_size, config.data.max_regions
    return dict(
        image=jnp.zeros((n, side, side, 3), jnp.float32),
        region_masks=jnp.zeros((n, m, side, side), bool),
        region_labels=jnp.full((n, m), -1, jnp.int32),
        region_mask=jnp.zeros((n, m), bool),
        has_masks=jnp.zeros((n,), bool),
        semantic=jnp.full((n, side, side), -1, jnp.int32),
        has_semantic=jnp.zeros((n,), bool),
    )


def lower_dense_step(config: ml_collections.ConfigDict, devices: list):
    """(the dense step lowered for `devices`, real or abstract (a TPU topology), its mesh): ahead-of-time memory
    without data or weights; the class vocabulary is `dense.num_classes` zeros."""
    check_config(config)
    if not config.dense.num_classes:
        raise ValueError("compiling dense adaptation ahead of time needs dense.num_classes (the training classes)")
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_size(config.batch_size, mesh)
    model, tx = build_model(from_config(config)), make_optimizer(config.optim, config.num_steps)  # no tokenizer file
    decoder = make_decoder(config.dense, model)
    classes = [f"class {i}" for i in range(config.dense.num_classes - len(config.dense.stuff_classes))]
    target_spec = TargetSpec.of(config, (*classes, *config.dense.stuff_classes))
    text = np.zeros((config.dense.num_classes, model.spec.embed_dim), np.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        _, state = abstract_dense_state(config, model, decoder, tx, mesh)
        where = sharding.batch_sharding(mesh)
        batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
            jax.eval_shape(lambda: example_batch(config, config.batch_size)),
        )
        step = jax.jit(make_dense_step(config, model, decoder, tx, text, target_spec), donate_argnums=0)
        return step.lower(state, batch), mesh


def abstract_dense_state(config, model: Model, decoder: MaskDecoder, tx, mesh):
    """(init function, sharded state shapes) of backbone + decoder, as `state.abstract_state` for the model."""
    spec = from_config(config)
    size = model.image.size()
    side = config.image_size // size.patch

    def init(rng):
        backbone_rng, decoder_rng = jax.random.split(rng)
        grid = jnp.zeros((1, side, side, size.width), model.image.tower.dtype)  # traced: abstract devices too
        params = {
            "backbone": init_params(model, spec, backbone_rng, regions=config.data.max_regions),
            "decoder": decoder.init(decoder_rng, grid)["params"],
        }
        return fresh_state(params, tx)

    return sharded_init(init, mesh, config.axis_rules)


def check_config(config: ml_collections.ConfigDict) -> None:
    """One line for a dense adaptation that cannot train as configured."""
    if not config.data.masks:
        raise ValueError("dense adaptation needs masked rows: set data.masks=True")
    if tuple(config.optim.trainable) == ():
        raise ValueError("dense adaptation trains the decoder (and adapters): set optim.trainable=('decoder', ...)")
    if config.model.image.cluster_ratio:
        raise ValueError("dense adaptation reads the full token grid: set model.image.cluster_ratio=0")
    targets_per_image = config.data.max_regions + len(config.dense.stuff_classes)
    if targets_per_image > config.dense.num_queries:
        raise ValueError(
            f"dense.num_queries={config.dense.num_queries} < {targets_per_image} targets an image "
            "(data.max_regions + stuff classes): each target needs its own query"
        )


def adapt(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the decoder (and adapters) to `config.num_steps`, resuming from `<workdir>/checkpoints`; evaluates
    the held-out split at the end (`evals/dense.py`) and returns its metrics."""
    check_config(config)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    ckpt = Checkpoints(workdir, config.keep_checkpoints, config.checkpoint_every)
    pretrained = pretrained_weights(config, ckpt)
    if pretrained is None and ckpt.latest_step() is None:
        raise ValueError("dense adaptation starts from a trained model: set init_from (python -m cloc_jax.export)")
    tokenizer, model, tx = build(config)
    decoder = make_decoder(config.dense, model)
    spec = from_config(config)
    classes = sources.segmentation_classes(pipeline.make_source(config.data, "train", config.image_size))
    target_spec = TargetSpec.of(config, classes)
    data_stats = pipeline.DataStats()
    data_iter = pipeline.train_iterator(config, tokenizer, data_stats)
    writer = MetricWriter(workdir)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
            init, shapes = abstract_dense_state(config, model, decoder, tx, mesh)
            latest, state = ckpt.restore_newest(shapes, data_iter, spec)
            if latest is not None:
                print(f"Resumed from {ckpt.directory} at step {latest}", flush=True)
            else:
                where = jax.tree.map(lambda s: s.sharding, shapes)
                state = jax.jit(init, out_shardings=where)(jax.random.key(config.seed))
                backbone = init_from(state.replace(params=state.params["backbone"]), pretrained, config.model.scan)
                state = state.replace(params={**state.params, "backbone": backbone.params})
            backbone = Encoder(model, state.params["backbone"], tokenizer, spec, config.axis_rules)
            text = backbone.encode_classes(seen_names(config, classes), config.dense.templates)
            step_fn = None
            progress = tqdm(range(int(state.step), config.num_steps), initial=int(state.step), total=config.num_steps)
            for step in progress:
                batch = sharding.global_batch(next(data_iter), mesh)
                if step_fn is None:
                    step_fn = jax.jit(make_dense_step(config, model, decoder, tx, text, target_spec), donate_argnums=0)
                    step_fn = step_fn.lower(state, batch).compile()
                    guards.check_step_memory(step_fn, jax.local_devices()[0])
                state, metrics = step_fn(state, batch)
                done = step + 1
                if done % config.log_every == 0 or done == config.num_steps:
                    row = {**jax.device_get(metrics), **data_stats.snapshot()}
                    writer.write(done, row, echo=progress.write)
                    guards.check_nonfinite(metrics, done, config.optim.max_nonfinite_steps, ckpt.latest_step())
                ckpt.save(done, state, data_iter, spec, force=done == config.num_steps)
            progress.close()
            results = dense_eval.evaluate(config, model, decoder, state.params, tokenizer, mesh)
            writer.write(config.num_steps, results, echo=print)
            return results
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
