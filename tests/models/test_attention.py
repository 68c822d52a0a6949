"""attend(): every kernel against a NumPy float64 softmax attention written here (forward and gradients).

Splash runs in the Pallas interpreter on CPU (numbers) and is compiled ahead of time for an abstract v5p
topology (its Mosaic kernels really build); cuDNN can only be lowered here (no GPU, no cuDNN)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cloc_jax.config import AXIS_RULES
from cloc_jax.models.attention import RESIDUALS, attend, pick_kernel
from cloc_jax.train import aot


def reference(q, k, v, dout, *, causal=False, segments=None, bias=None):
    """float64 softmax(q k / sqrt(K) + bias) v over the allowed keys, and its gradients for output
    cotangent `dout` (the textbook backward: dS = P * (dP - rowsum(dP * P)))."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    (b, t, _, d), s = q.shape, k.shape[1]
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(d)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    allowed = np.ones((b, 1, t, s), bool)
    if causal:
        allowed &= np.tril(np.ones((t, s), bool))
    if segments is not None:
        q_ids, kv_ids = (np.asarray(x) for x in segments)
        allowed &= q_ids[:, None, :, None] == kv_ids[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshk->bthk", p, v)
    dp = np.einsum("bthk,bshk->bhts", dout, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    grads = (
        np.einsum("bhts,bshk->bthk", ds, k) / np.sqrt(d),
        np.einsum("bhts,bthk->bshk", ds, q) / np.sqrt(d),
        np.einsum("bhts,bthk->bshk", p, dout),
    )
    return out, grads


def inputs(b, t, s, h=2, d=64, seed=0):
    """q [b, t, h, d], k, v [b, s, h, d] and an output cotangent, float32 (NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    shapes = [(b, t, h, d), (b, s, h, d), (b, s, h, d), (b, t, h, d)]
    return tuple(rng.standard_normal(shape, np.float32) for shape in shapes)


def packed_ids(lengths, total):
    """Segment ids of texts of `lengths` laid end to end, then padding (its own id) up to `total`."""
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    return np.pad(ids, (0, total - len(ids)), constant_values=len(lengths)).astype(np.int32)


def forward_and_grads(q, k, v, dout, **kwargs):
    """(attend's output, its gradients for `dout`), in one jit."""
    segments, bias = kwargs.pop("segment_ids", None), kwargs.pop("bias", None)

    def run(q, k, v, dout, segments, bias):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, segment_ids=segments, bias=bias, **kwargs), q, k, v)
        return out, vjp(dout)

    return jax.jit(run)(q, k, v, dout, segments, bias)


def assert_matches(got, want, atol=2e-5):
    (out, grads), (ref_out, ref_grads) = got, want
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=atol)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=atol, rtol=atol, err_msg=f"d{name}")


T = 24
TEXTS = np.stack([packed_ids([5, 9, 3], T), packed_ids([T], T)])  # packed texts + padding; one full row
LOGSIZE = np.log(np.arange(1, T + 1, dtype=np.float32))[None, None, None, :].repeat(2, 0)  # [B, 1, 1, S]


@pytest.mark.parametrize(
    "causal, segments, bias",
    [
        (False, None, None),
        (True, None, None),
        (False, (TEXTS, TEXTS), None),
        (True, (TEXTS, TEXTS), None),  # packed causal texts: padding attends to padding only
        (False, None, LOGSIZE),  # UMG-CLIP's per-key log-size bias
        (True, (TEXTS, TEXTS), np.random.default_rng(0).normal(size=(2, 2, T, T))),  # per-head bias with both
    ],
)
def test_xla_matches_the_float64_reference(causal, segments, bias):
    q, k, v, dout = inputs(2, T, T)
    got = forward_and_grads(q, k, v, dout, causal=causal, segment_ids=segments, bias=bias, kernel="xla")
    assert_matches(got, reference(q, k, v, dout, causal=causal, segments=segments, bias=bias))


def test_xla_cross_attention_with_different_query_and_key_segments():
    q, k, v, dout = inputs(2, 5, 17)
    segments = (np.array([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]]), np.array([[0] * 6 + [1] * 6 + [2] * 5, [0, 1] * 8 + [0]]))
    got = forward_and_grads(q, k, v, dout, segment_ids=segments, kernel="xla")
    assert_matches(got, reference(q, k, v, dout, segments=segments))


@pytest.mark.parametrize(
    "t, s, causal, segments",
    [
        # text: 77 tokens padded to 128 inside, packed texts and their padding id, causal
        (77, 77, True, (np.stack([packed_ids([20, 30, 11], 77), packed_ids([77], 77)]),) * 2),
        # no mask, no padding: 256 tokens in one block of 256, the kernel without segment ids
        (256, 256, False, None),
        # cross-attention 40 -> 196 (a ViT-B/16 grid) without a mask: both sides padded, padding ids made inside
        (40, 196, False, None),
    ],
)
def test_splash_in_the_interpreter_matches_the_reference(t, s, causal, segments):
    q, k, v, dout = inputs(2, t, s)
    got = forward_and_grads(q, k, v, dout, causal=causal, segment_ids=segments, kernel="splash", interpret=True)
    assert got[0].shape == q.shape
    assert_matches(got, reference(q, k, v, dout, causal=causal, segments=segments))


def test_splash_under_a_mesh_runs_in_shard_map_and_matches_the_reference():
    """8 CPU devices as data x fsdp x tensor = 4 x 1 x 2 with the config's axis rules: batch over
    (data, fsdp), heads over tensor; 3 heads do not divide tensor=2 and are replicated. Two axes of size
    > 1, not three: XLA:CPU can deadlock the collectives of a three-axis simulated mesh."""
    mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    q, k, v, dout = inputs(4, 77, 77, h=3)
    segments = (np.stack([packed_ids([10 + i, 30, 7], 77) for i in range(4)]),) * 2
    with jax.set_mesh(mesh), nn.logical_axis_rules(AXIS_RULES):
        got = forward_and_grads(q, k, v, dout, causal=True, segment_ids=segments, kernel="splash", interpret=True)
    assert_matches(got, reference(q, k, v, dout, causal=True, segments=segments))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, segments):
        b, t, width = x.shape
        qkv = nn.DenseGeneral((3, 2, width // 2), dtype=jnp.bfloat16)(x)  # [B, T, 3, H, K]
        q, k, v = (qkv[:, :, i] for i in range(3))
        out = attend(q, k, v, causal=True, segment_ids=segments, kernel="splash")
        return x + nn.with_logical_constraint(out.reshape(b, t, width), ("batch", "length", "embed")), None


DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
SAVE_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    DOTS, jax.checkpoint_policies.save_only_these_names(RESIDUALS)
)


@pytest.mark.parametrize("policy, forwards", [(DOTS, 2), (SAVE_ATTENTION, 1)], ids=["dots", "dots+residuals"])
def test_splash_compiles_for_a_v5p_topology_inside_scan_and_remat_under_a_mesh(policy, forwards):
    """The real Mosaic kernels (forward, dq, dkv) build for 4 abstract v5p chips, from a scanned,
    rematerialised flax block under jax.set_mesh with the config's axis rules (the training step's setting).
    A Pallas call is no dot: a dots policy runs the forward kernel again in the backward pass unless the
    policy also saves RESIDUALS."""
    devices = aot.topology_devices("v5p:2x2x1")
    mesh = Mesh(np.asarray(devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    blocks = nn.scan(
        nn.remat(_Block, policy=policy),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,),
        length=2,
    )()
    x = jax.ShapeDtypeStruct((4, 77, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    ids = jax.ShapeDtypeStruct((4, 77), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    params = jax.eval_shape(blocks.init, jax.random.key(0), x, (ids, ids))

    def loss(params, x, ids):
        return blocks.apply(params, x, (ids, ids))[0].astype(jnp.float32).mean()

    with jax.set_mesh(mesh), nn.logical_axis_rules(AXIS_RULES):
        compiled = jax.jit(jax.grad(loss)).lower(params, x, ids).compile()
    hlo = compiled.as_text()
    calls = [line for line in hlo.splitlines() if re.search(r"%splash_mha_[\w.]+ = .*custom-call\(", line)]
    names = [re.search(r"%(splash_mha_[a-z_]+)", line).group(1) for line in calls]
    assert sorted(names) == sorted(
        ["splash_mha_fwd_segmented_residuals"] * forwards
        + ["splash_mha_dq_segmented_no_residuals", "splash_mha_dkv_segmented_no_residuals"]
    )
    # shard_map: each chip's kernels see its own 2 of 4 examples and 1 of 2 heads, 77 tokens padded to 128
    assert all("bf16[2,1,128,128]" in line for line in calls), calls


def test_cudnn_lowers_for_cuda_with_causal_and_segment_ids(monkeypatch):
    """Only lowering can be checked here: jax asks cuDNN its version while tracing (None without CUDA),
    so that check is faked; nothing is compiled or run."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
    x = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)

    def lowered(causal: bool, packed: bool) -> str:
        def loss(q, k, v, ids):
            out = attend(q, k, v, causal=causal, segment_ids=(ids, ids) if packed else None, kernel="cudnn")
            return out.astype(jnp.float32).sum()

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return step.trace(x, x, x, ids).lower(lowering_platforms=("cuda",)).as_text()

    causal = lowered(causal=True, packed=False)
    assert "__cudnn$fmhaSoftmax(" in causal and "__cudnn$fmhaSoftmaxBackward" in causal and "CAUSAL" in causal
    packed = lowered(causal=False, packed=True)
    assert "__cudnn$fmhaScaleBiasSoftmax(" in packed and "__cudnn$fmhaScaleBiasSoftmaxBackward" in packed


def test_bad_input_is_one_line_and_the_picker_falls_back_to_xla():
    q = jnp.zeros((2, 77, 2, 64), jnp.bfloat16)
    ids = jnp.zeros((2, 77), jnp.int32)
    f32 = q.astype(jnp.float32)
    bad = [
        (dict(kernel="flash"), r"^attention kernel='flash'; choose one of \('xla', 'cudnn', 'splash'\)$"),
        (dict(bias=jnp.zeros((2, 1, 1, 77)), kernel="splash"), "kernel='splash' takes no bias"),
        (dict(segment_ids=(ids, ids), kernel="cudnn"), "cuDNN's backward with a bias needs even T and S, got 77, 77"),
        (dict(segment_ids=(ids, ids[:, :5])), r"segment_ids must be \(\[B, T\], \[B, S\]\)"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message) as error:
            attend(q, q, q, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="needs bfloat16 or float16 inputs, got float32"):
        attend(f32, f32, f32, kernel="cudnn")
    long = jax.ShapeDtypeStruct((2, 577, 4, 64), jnp.bfloat16)  # L/14 at 336 px
    assert pick_kernel("tpu", long, long) == "splash" and pick_kernel("tpu", q, q) == "xla"  # q: 77 tokens
    assert pick_kernel("tpu", q, q, bias=jnp.zeros(())) == "xla"
    assert pick_kernel("gpu", q, q, causal=True) == "cudnn"
    assert pick_kernel("gpu", q, q, segment_ids=(ids, ids)) == "xla"  # a mask bias with odd lengths
    assert pick_kernel("gpu", f32, f32) == "xla"
    assert pick_kernel("cpu", q, q) == "xla"
