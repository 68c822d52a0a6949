"""GPU presets (cloc_jax/gpu.py) on any machine; on an NVIDIA GPU (`pytest -m gpu`, JAX_PLATFORMS=cuda, as
bench/gpu_check.sh runs them): cuDNN attention against XLA's, a bf16 CLOC step, accumulation on the GPU."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloc_jax import gpu
from cloc_jax.models import attention

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")


def test_flags_this_jaxlib_does_not_know_are_dropped_and_the_users_values_win():
    env = {**os.environ, "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}
    known, unknown = gpu.accepted({"xla_gpu_enable_pipelined_all_gather": "true", "xla_gpu_graph_level": "0"}, env)
    assert known == {"xla_gpu_enable_pipelined_all_gather": "true"} and unknown == ["xla_gpu_graph_level"]

    lines = gpu.apply_presets(env)
    flags = env["XLA_FLAGS"].split()
    assert flags.count("--xla_gpu_enable_latency_hiding_scheduler=false") == 1  # the user's, not the preset's
    assert not any(f.startswith("--xla_gpu_enable_latency_hiding_scheduler=true") for f in flags)
    assert "--xla_gpu_enable_while_loop_double_buffering=true" in flags
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == gpu.MEMORY_FRACTION and lines[0].startswith("GPU preset:")
    with pytest.raises(ValueError, match="XLA_FLAGS has flags this jaxlib does not know: --xla_gpu_graph_level=0"):
        gpu.apply_presets({**os.environ, "XLA_FLAGS": "--xla_gpu_graph_level=0"})  # the user's own: one line


def test_gpu_hosts_are_recognised_only_where_jax_may_use_cuda():
    assert not gpu.on_gpu_host({"CUDA_VISIBLE_DEVICES": ""})
    assert not gpu.on_gpu_host({"JAX_PLATFORMS": "cpu"})
    assert gpu.on_gpu_host({}) == bool(os.path.exists("/dev/nvidia0"))


def test_auto_attention_takes_cudnn_only_on_ampere_or_newer(monkeypatch):
    q = jax.ShapeDtypeStruct((2, 196, 12, 64), jnp.bfloat16)
    monkeypatch.setattr(attention, "gpu_generation", lambda: 9.0)
    assert attention.pick_kernel("gpu", q, q) == "cudnn"
    monkeypatch.setattr(attention, "gpu_generation", lambda: 7.0)  # V100: no cuDNN flash attention
    assert attention.pick_kernel("gpu", q, q) == "xla"
    with pytest.raises(ValueError, match="Ampere or newer"):
        attention.attend(*(jnp.zeros(q.shape, q.dtype),) * 3, kernel="cudnn")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("tokens, causal", [(197, False), (77, True)])
def test_cudnn_attention_equals_xla_in_value_and_gradient(tokens, causal):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, dout = (jax.random.normal(key, (4, tokens, 8, 64), jnp.bfloat16) for key in keys)

    def run(kernel):
        out, pullback = jax.vjp(lambda *qkv: attention.attend(*qkv, causal=causal, kernel=kernel), q, k, v)
        return (out, *pullback(dout))

    for have, want in zip(jax.jit(lambda: run("cudnn"))(), jax.jit(lambda: run("xla"))()):
        have, want = np.asarray(have, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(have, want, atol=2e-2 * np.abs(want).max())  # bf16 rounding, two orders


@pytest.mark.gpu
@on_gpu
def test_a_bf16_cloc_step_is_finite_and_runs_cudnn_attention():
    from tests.test_accumulate import _gradients

    loss, parts, grads, hlo = _gradients("cloc", 1, jax.devices()[:1], overrides={"model.dtype": "bfloat16"}, hlo=True)
    assert np.isfinite(loss) and all(np.isfinite(v) for v in parts.values())
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert "cudnn$fmha" in hlo  # model.attention=auto chose cuDNN for the towers


@pytest.mark.gpu
@on_gpu
def test_accumulated_gradients_equal_the_whole_batch_on_the_gpu():
    from tests.test_accumulate import _gradients, _same

    with jax.default_matmul_precision("highest"):  # float32 matmuls, not TF32: the 1e-5 comparison needs them
        want = _gradients("cloc", 1, jax.devices()[:1])
        _same(_gradients("cloc", 4, jax.devices()[:1]), want)
