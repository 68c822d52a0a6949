"""Ahead-of-time compilation of the real training step for a TPU topology, on a machine without TPUs.

libtpu describes any topology ("v5p:8x8x16") as abstract devices; the step is lowered and compiled
for them exactly as on the pod, and XLA reports per-device memory. FLOPs come from `model_flops`
(analytic): XLA's cost analysis counts a scanned layer once. XLA's TPU cost model cannot price a
loop (it returns -1 per unpriced op), so the step-time estimate (`estimate=True`) compiles the step
again with the layers unrolled, at two shallow depths, and extrapolates (`estimate_step_seconds`).
"""

import math
import os
import re
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from cloc_jax import sharding
from cloc_jax.models.build import build, example_batch
from cloc_jax.models.clustering import num_clusters
from cloc_jax.models.heads import region_head
from cloc_jax.models.spec import from_config
from cloc_jax.models.vit import ROI_SIZE, vit_size
from cloc_jax.optim import make_optimizer
from cloc_jax.train import dense
from cloc_jax.train.state import abstract_state
from cloc_jax.train.step import make_train_step

GIB = 2**30
# device_kind -> (peak bf16 FLOP/s, HBM bytes) per JAX device, from the Cloud TPU documentation.
# libtpu's abstract v4 topologies list each TensorCore as a device (half a chip: v4:8x8x8 is 512
# chips, 1024 devices); v5e and v5p list chips.
DEVICES = {
    "TPU v4": (137.5e12, 16 * GIB),
    "TPU v5 lite": (197e12, 16 * GIB),
    "TPU v5": (459e12, 95 * GIB),
    "TPU v6 lite": (918e12, 32 * GIB),
}


def _encoder_flops(tokens: int, width: int, depth: int, mlp: int) -> float:
    """Forward matmul FLOPs of `depth` pre-LN blocks over `tokens` tokens (QKV + out, MLP, scores)."""
    return depth * (2 * tokens * 4 * width**2 + 2 * tokens * 2 * width * mlp + 2 * 2 * tokens**2 * width)


def _text_flops(length: int, texts: int, t: ml_collections.ConfigDict, e: int) -> float:
    """Training FLOPs of one text-tower row of `length` tokens holding `texts` texts (packed when more
    than one): the tower, EOT pooling (a one-hot matmul) and the projection of each text."""
    tower = _encoder_flops(length, t.width, t.depth, t.mlp_dim) + texts * 2 * t.width * e
    return 3 * tower + 2 * texts * 2 * length * t.width


def model_flops(config: ml_collections.ConfigDict, num_tags: int = 0) -> float:
    """Training FLOPs per example, as XLA would count the matmuls of the step: 3 x forward (the backward
    takes input and weight gradients), 2 x where one operand is a constant (images, boxes, one-hot
    selections: it gets no gradient), 1 x under stop_gradient. Remat recomputation is not model FLOPs;
    what runs once per step (the tag vocabulary of `num_tags` names) is shared by the batch."""
    model, tok, im, t = config.model, config.tokenizer, config.model.image, config.model.text
    size = vit_size(im.variant, im.width, im.depth, im.heads, im.mlp_dim)
    d, e, b, m = size.width, model.embed_dim, config.batch_size, config.data.max_regions
    side = config.image_size // size.patch
    n, prefix = side**2, int(im.pool == "cls")
    k, early = (num_clusters(n, im.cluster_ratio), im.cluster_layer) if im.cluster_ratio else (n, size.depth)
    flops = 2 * 2 * n * size.patch**2 * 3 * d  # patch embedding
    flops += 3 * _encoder_flops(n + prefix, d, early, size.mlp_dim)
    flops += 3 * _encoder_flops(k + prefix, d, size.depth - early, size.mlp_dim)  # clustered: on K tokens
    if im.cluster_ratio:  # distances and distances to the centres (stop_gradient); merge and unfold (one-hot)
        flops += 2 * n * n * (d + k) + 2 * 2 * 2 * n * k * d
    if im.adapter_dim:  # two Convpass per block: down, 3x3 conv over the grid, up
        a = im.adapter_dim
        flops += 3 * size.depth * 2 * (2 * 2 * (n + prefix) * d * a + 2 * n * 9 * a * a)
    if im.pool == "map":  # one probe attending over n tokens, then its MLP
        flops += 3 * (2 * 2 * d**2 + 2 * 2 * n * d**2 + 2 * 2 * n * d + 2 * 2 * d * size.mlp_dim)
    proj = 3 * 2 * d * e if im.project else 0  # an image or region embedding's projection
    flops += proj + _text_flops(tok.context_length, 1, t, e) + 3 * 2 * b * e  # this example's row of the logits
    if num_tags:  # the vocabulary through the text tower once a step; tag similarities
        tags = num_tags
        flops += tags * _text_flops(tok.region_context_length, 1, t, e) / b
        flops += 3 * 2 * tags * e * ((config.tags.image_weight > 0) + m * (config.tags.region_weight > 0))
    head = region_head(model.region_extractor)
    if not head.trains:
        return flops
    if tok.region_pack_length:  # one packed row per image
        flops += _text_flops(tok.region_pack_length, m, t, e)
    else:
        flops += m * _text_flops(tok.region_context_length, 1, t, e)
    flops += 3 * 2 * m * (b * m) * e + 2 * m * (b * m) * e  # region-text logits; text-text filter (stop_gradient)
    if head.image_pool == "roi_align":  # two interpolation einsums (weights from the boxes); head
        return flops + 2 * 2 * m * ROI_SIZE * side * (side + ROI_SIZE) * d + m * proj
    # Prompter: image keys/values once; 2 box-corner rows and 1 text row per region, each through
    # q/k/v/out, attention over the n image tokens and its own prompt tokens, MLP; region and box heads.
    rows = 3 * m
    flops += 3 * (2 * 2 * n * d**2 + rows * (2 * 4 * d**2 + 2 * 2 * n * d + 2 * 2 * d * 4 * d))
    flops += 3 * (2 * 2 * (2 * 2 + 1) * m * d + 2 * m * (d * e + e * d + d * (d + 4)))
    # Constant inputs: key positions (once a step), corner encodings, the box head's grid centres.
    return flops + 2 * (2 * n * d**2 / b + 2 * m * 2 * d**2 + 2 * 2 * m * n * 2)


def topology_devices(topology: str, slices: int = 1) -> list:
    """Abstract TPU devices of a topology such as "v5p:8x8x16"; one-line error without libtpu."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError(f"compiling for TPU topology {topology!r} needs libtpu: pip install -e '.[tpu]'") from None
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no chips to guard from others
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=slices)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot describe TPU topology {topology!r}: {first}") from None
    return list(desc.devices)


def lower_step(config: ml_collections.ConfigDict, devices: list, tags: np.ndarray | None = None):
    """(the training step lowered for `devices`, its mesh): XLA's cost analysis of it needs no compilation.
    `tags`: the tag vocabulary [T, L'] of a config with tag losses (`pipeline.tag_vocabulary`)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_size(config.batch_size, mesh)
    spec = from_config(config)
    model, tx = build(spec), make_optimizer(config.optim, config.num_steps)
    num_tags = 0 if tags is None else len(tags)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.axis_rules):
        _, state = abstract_state(config, model, tx, mesh)
        batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
            jax.eval_shape(lambda: example_batch(spec, config.batch_size, config.data.max_regions, num_tags)),
        )
        return jax.jit(make_train_step(config, model, tx, tags), donate_argnums=0).lower(state, batch), mesh


def compile_on(config: ml_collections.ConfigDict, devices: list, tags: np.ndarray | None = None):
    """(compiled training step for `devices`, its mesh, seconds lowering and compiling took)."""
    start = time.perf_counter()
    if "dense" in config:  # dense adaptation (train/dense.py): its own step
        lowered, mesh = dense.lower_dense_step(config, devices)
    else:
        lowered, mesh = lower_step(config, devices, tags)
    return lowered.compile(), mesh, time.perf_counter() - start


def compile_for(
    config: ml_collections.ConfigDict, devices: list, estimate: bool = False, tags: np.ndarray | None = None
) -> dict:
    """Compiles the training step for `devices` (real or abstract) -> memory, FLOPs and, with
    `estimate`, XLA's cost-model step time and the MFU it implies."""
    kind = devices[0].device_kind
    peak, hbm = DEVICES.get(kind, (float("nan"), float("nan")))
    num_tags = 0 if tags is None else len(tags)
    if estimate and "dense" in config:
        raise ValueError("--aot_estimate prices pretraining steps; dense adaptation reports memory only")
    try:
        compiled, mesh, seconds = compile_on(config, devices, tags)
    except jax.errors.JaxRuntimeError as e:  # XLA refuses programs that cannot fit in HBM
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
            raise
        return _out_of_memory(config, devices, float(needed.group(1)) * 1e9 / GIB, hbm, num_tags)
    memory = compiled.memory_analysis()
    state = jax.tree.map(  # the training state as the step takes it
        lambda info, where: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=where),
        compiled.args_info[0][0],
        compiled.input_shardings[0][0],
    )
    replicated = sharding.replicated_arrays(state)
    per_device = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    per_device += memory.temp_size_in_bytes + memory.generated_code_size_in_bytes
    flops = float("nan") if "dense" in config else model_flops(config, num_tags) * config.batch_size
    step, depths = estimate_step_seconds(config, devices, tags) if estimate else (float("nan"), [])
    return dict(
        device_kind=kind,
        devices=len(devices),
        mesh=dict(mesh.shape),
        batch_size=config.batch_size,
        arguments_gib=memory.argument_size_in_bytes / GIB,
        outputs_gib=memory.output_size_in_bytes / GIB,
        aliased_gib=memory.alias_size_in_bytes / GIB,
        temporaries_gib=memory.temp_size_in_bytes / GIB,
        per_device_gib=per_device / GIB,
        hbm_gib=hbm / GIB,
        fits=per_device <= hbm,
        model_tflops_per_step=flops / 1e12,
        replicated_mib=sum(size for _, _, size in replicated) / 2**20,  # arrays >= 1 MiB every device holds whole
        replicated=[path for path, _, _ in replicated],
        estimated_step_seconds=step,
        estimated_mfu=flops / (len(devices) * peak * step),
        estimated_from_depths=depths,
        compile_seconds=seconds,
    )


def estimate_depths(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """The (image, text) depths `estimate_step_seconds` compiles: the towers' full depths divided by g, their
    greatest common divisor, times k and k + 1 (k: the first with image layers after the clustering layer,
    whose tokens differ); the full depths alone when that saves nothing."""
    im = config.model.image
    image, text = _full_depths(config)
    g = math.gcd(image, text)
    k = next((k for k in range(1, g) if not im.cluster_ratio or k * image // g > im.cluster_layer), g)
    if k + 1 >= g:
        return [(image, text)]
    return [(k * image // g, k * text // g), ((k + 1) * image // g, (k + 1) * text // g)]


def estimate_step_seconds(
    config: ml_collections.ConfigDict, devices: list, tags: np.ndarray | None = None
) -> tuple[float, list]:
    """(XLA's cost-model seconds per step on `devices`, the depths compiled), NaN when it prices no time.

    The cost model needs the layers unrolled, and unrolled at full depth the L/14 step for 1,024 chips
    takes most of an hour and over 10 GB of host memory to compile. Every layer of a tower adds the same
    ops (same mesh, batch and sharding); the rest of the step does not depend on depth. So the step is
    compiled unrolled at two shallow depths in the towers' ratio (`estimate_depths`: 2 + 1 and 4 + 2
    layers for L/14) and the line through the two times is read at the full depths."""
    depths, seconds = estimate_depths(config), []
    for image, text in depths:
        shallow = config.copy_and_resolve_references()
        shallow.model.scan = False
        shallow.model.image.depth, shallow.model.text.depth = image, text
        seconds.append(float(compile_on(shallow, devices, tags)[0].cost_analysis().get("optimal_seconds", -1)))
    if min(seconds) <= 0:  # negative: some op the cost model cannot price
        return float("nan"), depths
    if len(seconds) == 1:
        return seconds[0], depths
    (short, _), (longer, _) = depths
    full = _full_depths(config)[0]
    return seconds[0] + (seconds[1] - seconds[0]) * (full - short) / (longer - short), depths


def _full_depths(config: ml_collections.ConfigDict) -> tuple[int, int]:
    im = config.model.image
    return vit_size(im.variant, im.width, im.depth, im.heads, im.mlp_dim).depth, config.model.text.depth


def _out_of_memory(
    config: ml_collections.ConfigDict, devices: list, temporaries_gib: float, hbm: float, num_tags: int
) -> dict:
    """The report of a step XLA refused to compile: its temporaries alone exceed HBM."""
    nan = float("nan")
    return dict(
        device_kind=devices[0].device_kind,
        devices=len(devices),
        mesh=dict(sharding.make_mesh(config.mesh, devices).shape),
        batch_size=config.batch_size,
        arguments_gib=nan,
        outputs_gib=nan,
        aliased_gib=nan,
        temporaries_gib=temporaries_gib,
        per_device_gib=temporaries_gib,  # at least
        hbm_gib=hbm / GIB,
        fits=False,
        model_tflops_per_step=model_flops(config, num_tags) * config.batch_size / 1e12,
        replicated_mib=nan,
        replicated=[],
        estimated_step_seconds=nan,
        estimated_mfu=nan,
        estimated_from_depths=[],
        compile_seconds=nan,
    )


def format_report(name: str, report: dict) -> str:
    """The report as the lines `launch/tpu.py --aot_topology` prints."""
    r = report
    known = lambda x: x == x  # noqa: E731 (NaN marks what is unknown)
    lines = [f"{name}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}, batch {r['batch_size']}"]
    if known(r["arguments_gib"]):
        lines.append(
            f"  per device: {r['per_device_gib']:.2f} GiB of {r['hbm_gib']:.0f} GiB HBM"
            f" ({'fits' if r['fits'] else 'DOES NOT FIT'})"
            f" = arguments {r['arguments_gib']:.2f} + outputs {r['outputs_gib']:.2f} - aliased {r['aliased_gib']:.2f}"
            f" + temporaries {r['temporaries_gib']:.2f}"
        )
    else:
        lines.append(
            f"  per device: DOES NOT FIT: XLA refused it, its temporaries alone need {r['temporaries_gib']:.2f} GiB"
            f" of {r['hbm_gib']:.0f} GiB HBM (try model.remat=full, a larger mesh.fsdp, or a smaller batch)"
        )
    if known(r["model_tflops_per_step"]):  # (dense adaptation: not counted)
        lines.append(f"  model FLOPs per step: {r['model_tflops_per_step']:.4g} TFLOP")
    if r["replicated"]:
        names = ", ".join(r["replicated"][:4]) + (", ..." if len(r["replicated"]) > 4 else "")
        lines.append(
            f"  replicated on every device: {len(r['replicated'])} arrays over 1 MiB, {r['replicated_mib']:.0f} MiB"
            f" ({names})"
        )
    if known(r["estimated_step_seconds"]):
        how = " and ".join(f"{i} + {t}" for i, t in r["estimated_from_depths"])
        how += ", extrapolated to full depth" if len(r["estimated_from_depths"]) > 1 else ""
        lines.append(
            f"  XLA cost model (layers unrolled, image + text depths {how}): {r['estimated_step_seconds']:.3f}"
            f" s/step, MFU {r['estimated_mfu']:.2f}"
        )
    elif known(r["arguments_gib"]) and known(r["model_tflops_per_step"]):
        lines.append("  step time: pass --aot_estimate for XLA's cost model (compiles again with layers unrolled)")
    if known(r["compile_seconds"]):
        lines.append(f"  compiled in {r['compile_seconds']:.0f} s")
    return "\n".join(lines)
