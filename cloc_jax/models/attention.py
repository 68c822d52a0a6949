"""One attention function with the right kernel per backend: XLA anywhere, cuDNN on NVIDIA GPUs, Pallas
splash attention on TPUs.

`attend(q [B, T, H, K], k [B, S, H, K], v [B, S, H, K]) -> [B, T, H, K]`, softmax(q k / sqrt(K) + bias) v.
Masks are `causal` (query t sees keys s <= t, top-left aligned like jnp.tril) and `segment_ids`
(q_ids [B, T], kv_ids [B, S] int32: a query sees only keys with its id; packed texts, padding as its own
id). Every query must see at least one key: kernels differ on empty rows. What each kernel takes in
JAX 0.10 (read from its source):

- "xla": everything. jax.nn.dot_product_attention(implementation="xla") (jax/_src/nn/functions.py
  `_apply_masks`); segment ids become a boolean `mask` XLA fuses into the softmax, never a float bias.
- "cudnn": jax.nn.dot_product_attention(implementation="cudnn") calls
  jax/_src/cudnn/fused_attention_stablehlo.py `dot_product_attention`: bf16/fp16 only (`check_layout`),
  head dim a multiple of 8 and <= 128 (256 on Hopper, `check_is_flash_attention`), causal (mask type
  CAUSAL), padding by lengths. jax.nn does not expose its packed segments (q_offsets/kv_offsets), so
  segment ids go as a boolean mask that `combine_bias_and_mask` turns into a dense [B, 1, T, S] bias,
  and a bias in training needs even T and S. No user bias here (cuDNN wants it with T and S in full).
- "splash": jax.experimental.pallas.ops.tpu.splash_attention: per example [H, T, K] (vmapped over the
  batch), no scaling inside (q is pre-scaled), SegmentIds and a static Causal/FullMask, lengths that
  are multiples of its blocks (of 128 with segment ids: they are padded here); no bias. Under a mesh
  (jax.set_mesh) it runs in shard_map, batch and heads split by the logical axis rules.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import AxisType, PartitionSpec

from cloc_jax.sharding import BATCH_AXES

KERNELS = ("xla", "cudnn", "splash")
# Mesh axes of the splash shard_map when no flax logical axis rules are active (as cloc_jax.config.AXIS_RULES).
DEFAULT_RULES = (("activation_batch", BATCH_AXES), ("activation_heads", "tensor"))
# checkpoint_name of splash's output and logsumexp (its backward's residuals): a remat policy that saves
# this name keeps the forward kernel from running again in the backward pass.
RESIDUALS = "attention_residuals"
LANES = 128  # splash's segment-id masking works on whole 128-lane tiles: lengths are padded to multiples
# "auto" takes splash on TPUs from this query length on. XLA's cost model on v5p (README, "Performance"): at 196
# tokens (B/16) and 77 (texts) XLA's attention is cheaper, its [B, H, T, T] logits still small and splash's
# padding to whole blocks large (256 / 196, 128 / 77); at 577 (L/14 at 336 px) splash is, by 0.12 of MFU.
# 257 (L/14 and H/14 at 224 px) keeps splash, unmeasured either way.
SPLASH_MIN_LENGTH = 256


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    bias: jax.Array | None = None,
    kernel: str = "xla",
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, H, K], k/v [B, S, H, K] -> [B, T, H, K]. `bias` broadcastable to [B, H, T, S] (xla only).
    `interpret` runs splash's Pallas kernels in the Pallas interpreter (tests on CPU)."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel={kernel!r}; choose one of {KERNELS}")
    _check_shapes(q, k, v, segment_ids)
    if kernel == "xla":
        mask = None if segment_ids is None else _segment_mask(*segment_ids)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal, implementation="xla")
    if bias is not None:
        raise ValueError(f"attention kernel={kernel!r} takes no bias (an additive bias needs kernel='xla')")
    if kernel == "cudnn":
        problem = cudnn_problem(q, k, causal=causal, segments=segment_ids is not None, gpu=gpu_generation())
        if problem:
            raise ValueError(f"attention kernel='cudnn': {problem}")
        mask = None if segment_ids is None else _segment_mask(*segment_ids)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    return _splash(q, k, v, causal, segment_ids, interpret)


def pick_kernel(
    platform: str,
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    bias: jax.Array | None = None,
) -> str:
    """The kernel for `platform` ("tpu", "gpu"/"cuda", "cpu", e.g. devices[0].platform) and these inputs
    (arrays or ShapeDtypeStructs): splash on TPU for queries of SPLASH_MIN_LENGTH or more, cuDNN on GPU where
    it qualifies, else XLA."""
    if bias is not None:
        return "xla"
    if platform == "tpu":
        return "splash" if q.shape[1] >= SPLASH_MIN_LENGTH else "xla"
    segments = segment_ids is not None
    if platform in ("gpu", "cuda") and not cudnn_problem(q, k, causal=causal, segments=segments, gpu=gpu_generation()):
        return "cudnn"
    return "xla"


def gpu_generation() -> float | None:
    """The compute capability of the first GPU JAX runs on (8.0 A100, 8.9 L4, 9.0 H100/H200), or None when JAX
    runs elsewhere (then a program lowered for CUDA is assumed to meet an Ampere or newer GPU)."""
    device = jax.devices()[0]
    return float(device.compute_capability) if device.platform == "gpu" else None


def cudnn_problem(q, k, *, causal: bool, segments: bool, gpu: float | None = None) -> str | None:
    """Why cuDNN (through jax.nn in JAX 0.10) cannot take these inputs on a GPU of compute capability `gpu`
    (None: not known), or None."""
    (_, t, _, d), s = q.shape, k.shape[1]
    if gpu is not None and gpu < 8.0:
        return f"cuDNN flash attention needs an Ampere or newer GPU (compute capability 8.0), this one is {gpu}"
    if jnp.dtype(q.dtype) not in (jnp.bfloat16, jnp.float16):
        return f"needs bfloat16 or float16 inputs, got {jnp.dtype(q.dtype).name}"
    if d % 8 or d > 128:
        return f"needs a head dim that is a multiple of 8 and at most 128 (256 on Hopper), got {d}"
    if causal and t != s:
        return f"causal needs T == S (cuDNN's causal alignment for T != S is unverified against XLA's), got {t}, {s}"
    if segments and (t % 2 or s % 2):
        return f"segment ids become a bias, and cuDNN's backward with a bias needs even T and S, got {t}, {s}"
    return None


def _check_shapes(q, k, v, segment_ids) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"attention needs q [B, T, H, K] and k, v [B, S, H, K], got {q.shape}, {k.shape}, {v.shape}")
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        if q_ids.shape != q.shape[:2] or kv_ids.shape != k.shape[:2]:
            want = f"({q.shape[:2]}, {k.shape[:2]})"
            raise ValueError(f"segment_ids must be ([B, T], [B, S]) = {want}, got {q_ids.shape}, {kv_ids.shape}")


def _segment_mask(q_ids: jax.Array, kv_ids: jax.Array) -> jax.Array:
    """[B, T], [B, S] -> boolean [B, 1, T, S] (XLA fuses the compare; cuDNN turns it into a bias)."""
    return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def _splash(q, k, v, causal: bool, segment_ids, interpret: bool) -> jax.Array:
    """Splash attention; under a mesh inside shard_map (a Pallas call is opaque to XLA's partitioner:
    without it every device would gather and compute the whole batch)."""
    segments = () if segment_ids is None else tuple(segment_ids)
    run = lambda q, k, v, segments: _splash_local(q, k, v, segments, causal, interpret)  # noqa: E731
    mesh = jax.sharding.get_abstract_mesh()
    free = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
    if mesh.empty or not free:  # no mesh, or already inside a shard_map over every axis
        return run(q, k, v, segments)
    batch, heads = _mesh_axes(mesh, free, q.shape[0], q.shape[2])
    spec, ids = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None)
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(spec, spec, spec, tuple(ids for _ in segments)),
        out_specs=spec,
        axis_names=free,
        check_vma=False,
    )(q, k, v, segments)


def _mesh_axes(mesh, free: set, batch: int, heads: int):
    """Mesh axes for the batch and heads dims from the active logical axis rules (default DEFAULT_RULES),
    keeping only free axes of this mesh; a dim they do not divide is replicated (12 heads on tensor=8)."""
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    out = []
    for dim, axes in zip((batch, heads), nn.logical_to_mesh_axes(("activation_batch", "activation_heads"), rules)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        names = tuple(a for a in names if a in free)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(names if names and dim % size == 0 else None)
    return out


def _splash_local(q, k, v, segments: tuple, causal: bool, interpret: bool) -> jax.Array:
    """Splash on this device's [b, T, h, K] block. T and S are padded to multiples of 128 with a padding
    segment: padded keys get an id no query has, padded queries repeat the last query's id (so no row is
    empty) and are sliced off."""
    b, t, h, d = q.shape
    s = k.shape[1]
    tp, sp = -(-t // LANES) * LANES, -(-s // LANES) * LANES
    ids = None
    if segments or (tp, sp) != (t, s):
        q_ids, kv_ids = segments or (jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32))
        q_ids = jnp.pad(q_ids.astype(jnp.int32), ((0, 0), (0, tp - t)), mode="edge")
        kv_ids = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))
        pad = jnp.minimum(jnp.min(q_ids), jnp.min(kv_ids[:, :s])) - 1  # no query's id
        kv_ids = jnp.where(jnp.arange(sp) < s, kv_ids, pad)
        ids = splash.SegmentIds(q_ids, kv_ids)

    def heads_first(x, length):  # [b, L, h, K] -> [b, h, L', K]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))

    q = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)  # rounded once (XLA scales f32 logits)
    mask = splash_mask.CausalMask((tp, sp)) if causal else splash_mask.FullMask((tp, sp))
    bq, bkv = _block(tp), _block(sp)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask((mask,) * h),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=RESIDUALS,
        interpret=interpret,
    )
    out = jax.vmap(kernel)(heads_first(q, tp), heads_first(k, sp), heads_first(v, sp), ids)  # [b, h, T', K]
    return out[:, :, :t].transpose(0, 2, 1, 3)


def _block(length: int) -> int:
    """The largest of 512, 256, 128 dividing `length` (a multiple of 128): short sequences (77 -> 128,
    196 -> 256, 577 -> 640) take few, whole blocks."""
    return next(b for b in (512, 256, 128) if length % b == 0)
