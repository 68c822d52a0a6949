"""Transformer building blocks shared by the image and text towers.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`) and key
activations carry their own (`activation_batch`, `activation_length`, `activation_embed`, ...), so sharding is
decided by the config's axis rules.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cloc_jax.models import rotary
from cloc_jax.models.adapters import Convpass
from cloc_jax.models.attention import KERNELS, RESIDUALS, attend, pick_kernel

Dtype = Any

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_KERNELS = ("auto", *KERNELS)
TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")  # logical axes of [B, T, D] tokens


@dataclasses.dataclass(frozen=True)
class TowerSettings:
    """What the image and text towers share, taken from the spec's model part (`build.tower_settings`):
    no defaults here, the spec's are the only ones."""

    out_dim: int  # the joint embedding width E
    activation: str
    ln_eps: float
    dtype: Dtype  # activations
    scan: bool  # layers stacked under nn.scan (compile time independent of depth) or unrolled
    remat: str  # "none" or a key of REMAT_POLICIES
    attention: str  # the blocks' attention kernel (Attention.kernel)


MLP_TYPES = ("standard", "swiglu")


@dataclasses.dataclass(frozen=True)
class BlockVariant:
    """Where an imported family's block departs from the pre-LayerNorm ViT block (the image spec's knobs; the
    defaults are the plain block, which the text tower always uses)."""

    mlp: str = "standard"  # fc1 -> activation -> fc2, or "swiglu": silu(fc1_g x) * fc1_x x -> fc2 (EVA-02)
    mlp_norm: bool = False  # a LayerNorm on the MLP's hidden units (EVA-02's sub-LayerNorm, timm's scale_mlp)
    attn_norm: bool = False  # a LayerNorm on the heads' output before the out projection (timm's scale_attn_inner)
    key_bias: bool = True  # False: the key projection has no bias (EVA-02)
    layer_scale: bool = False  # learned per-channel gains on both residual branches (timm's gamma_1, gamma_2)


def remat_policy(name: str):
    """A REMAT_POLICIES entry that also saves a fused attention kernel's output and logsumexp: a Pallas call is
    not a dot, so without this the backward pass would run the forward kernel again."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r}; choose none or one of {sorted(REMAT_POLICIES)}")
    if name == "full":
        return REMAT_POLICIES[name]
    saved = jax.checkpoint_policies.save_only_these_names(RESIDUALS)
    return jax.checkpoint_policies.save_from_both_policies(REMAT_POLICIES[name], saved)


def current_platform() -> str:
    """The platform the program is traced for: the mesh's devices under jax.set_mesh (TPU when compiling
    ahead of time for a topology on a CPU host), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def logical(init, names: tuple[str | None, ...]):
    """Wraps an initializer so the parameter it creates carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


# Activations by the names checkpoints use: flax's default nn.gelu is the tanh approximation (big_vision,
# SigLIP: "gelu_pytorch_tanh"), OpenAI CLIP trained with quick_gelu, open_clip's LAION models with exact GELU.
ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"model.activation={name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32, eps: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


class EinsumDense(nn.Module):
    """A dense layer whose kernel is created at its true rank, so every axis has a logical name.

    (nn.DenseGeneral creates a flat kernel and reshapes it, which breaks per-axis sharding.)
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...]
    fan_in: tuple[int, ...]
    dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_out = tuple(i for i in range(len(self.kernel_shape)) if i not in self.fan_in)
        init = nn.initializers.xavier_uniform(in_axis=self.fan_in, out_axis=fan_out)
        kernel = self.param("kernel", logical(init, self.kernel_axes), self.kernel_shape)
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        if not self.use_bias:
            return y
        bias_shape = tuple(self.kernel_shape[i] for i in fan_out)
        return y + self.param("bias", logical(nn.initializers.zeros, self.bias_axes), bias_shape).astype(self.dtype)


class Attention(nn.Module):
    """Multi-head attention. Queries from `x_q` [B, T, D], keys/values from `x_kv` [B, S, D].

    `kernel` (attention.KERNELS, or "auto": splash on TPU, cuDNN on GPU where it qualifies, else XLA; an
    additive `bias` always takes XLA). `segment_ids` ([B, T], [B, S]): a query sees only keys of its id."""

    heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    kernel: str = "xla"
    key_bias: bool = True
    out_norm: bool = False  # a LayerNorm over the heads' output [B, T, H*K] before the out projection
    ln_eps: float = 1e-6

    @nn.compact
    def __call__(
        self,
        x_q: jax.Array,
        x_kv: jax.Array,
        bias: jax.Array | None = None,
        segment_ids: tuple[jax.Array, jax.Array] | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """`rope` (cos, sin) [B or 1, T, 1, K] (`rotary.tables`) rotates queries and keys before any kernel sees
        them (self-attention only)."""
        if self.kernel not in ATTENTION_KERNELS:
            raise ValueError(f"model.attention={self.kernel!r}; choose one of {ATTENTION_KERNELS}")
        width = x_q.shape[-1]
        if width % self.heads:
            raise ValueError(f"width={width} is not divisible by heads={self.heads}")
        split = dict(
            equation="bsd,dhk->bshk",
            kernel_shape=(width, self.heads, width // self.heads),
            kernel_axes=("embed", "heads", "kv"),
            bias_axes=("heads", "kv"),
            fan_in=(0,),
            dtype=self.dtype,
        )
        q = EinsumDense(**split, name="query")(x_q)
        k = EinsumDense(**split, use_bias=self.key_bias, name="key")(x_kv)
        v = EinsumDense(**split, name="value")(x_kv)
        if rope is not None:
            q, k = rotary.rotate(q, *rope), rotary.rotate(k, *rope)
        kernel = self.kernel
        if kernel == "auto":
            kernel = pick_kernel(current_platform(), q, k, causal=self.causal, segment_ids=segment_ids, bias=bias)
        out = attend(q, k, v, causal=self.causal, segment_ids=segment_ids, bias=bias, kernel=kernel)  # [B, T, H, K]
        if self.out_norm:
            norm = layer_norm("norm", self.dtype, self.ln_eps)
            out = norm(out.reshape(*out.shape[:2], width)).reshape(out.shape)
        return EinsumDense(
            "bshk,hkd->bsd",
            (self.heads, width // self.heads, width),
            ("heads", "kv", "embed"),
            ("embed",),
            fan_in=(0, 1),
            dtype=self.dtype,
            name="out",
        )(out)


class Mlp(nn.Module):
    """[.., D] -> [.., D]: fc1 -> activation -> fc2, or SwiGLU (`kind="swiglu"`: silu(fc1_g x) * fc1_x x -> fc2);
    `norm` adds a LayerNorm on the hidden units before fc2."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"
    kind: str = "standard"
    norm: bool = False
    ln_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in MLP_TYPES:
            raise ValueError(f"model.image.mlp={self.kind!r}; choose one of {MLP_TYPES}")
        width = x.shape[-1]

        def up(name: str) -> jax.Array:
            return nn.Dense(
                self.mlp_dim,
                dtype=self.dtype,
                kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                bias_init=logical(nn.initializers.normal(1e-6), ("mlp",)),
                name=name,
            )(x)

        if self.kind == "swiglu":
            h = jax.nn.silu(up("fc1_g")) * up("fc1_x")
        else:
            h = activation_fn(self.activation)(up("fc1"))
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        if self.norm:
            h = nn.LayerNorm(
                epsilon=self.ln_eps,
                dtype=self.dtype,
                scale_init=logical(nn.initializers.ones, ("mlp",)),
                bias_init=logical(nn.initializers.zeros, ("mlp",)),
                name="norm",
            )(h)
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=logical(nn.initializers.normal(1e-6), ("embed",)),
            name="fc2",
        )(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; (x, bias, segment_ids, rope) -> (x, None) so `nn.scan` can stack it.

    `bias` (broadcastable to [B, heads, T, T], or None) is added to the attention logits; `segment_ids`
    ([B, T], [B, T]) keeps packed sequences apart; `rope` (cos, sin) rotates queries and keys (`rotary.tables`).
    `variant` holds an imported family's departures from the plain block."""

    heads: int
    mlp_dim: int
    activation: str  # the tower's shared settings (TowerSettings): no defaults here
    ln_eps: float
    dtype: Dtype
    attention: str
    causal: bool = False
    adapter_dim: int = 0  # > 0: Convpass adapters beside attention and MLP (needs adapter_grid)
    adapter_grid: tuple[int, int] | None = None
    adapter_scale: float = 0.1
    variant: BlockVariant = BlockVariant()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        bias: jax.Array | None = None,
        segment_ids: tuple[jax.Array, jax.Array] | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, None]:
        def adapter(name: str, y: jax.Array) -> jax.Array:
            if not self.adapter_dim:
                return 0.0
            return self.adapter_scale * Convpass(self.adapter_dim, self.adapter_grid, self.dtype, name=name)(y)

        def gain(name: str, y: jax.Array) -> jax.Array:
            if not v.layer_scale:
                return y
            scale = self.param(name, logical(nn.initializers.constant(0.1), ("embed",)), (y.shape[-1],))
            return y * scale.astype(y.dtype)

        v, eps = self.variant, self.ln_eps
        x = constrain(x, TOKEN_AXES)
        y = layer_norm("ln1", self.dtype, eps)(x)
        attn = Attention(self.heads, self.causal, self.dtype, self.attention, v.key_bias, v.attn_norm, eps, name="attn")
        x = x + gain("gamma_attn", attn(y, y, bias, segment_ids, rope)) + adapter("adapter_attn", y)
        y = layer_norm("ln2", self.dtype, eps)(x)
        mlp = Mlp(self.mlp_dim, self.dtype, self.activation, v.mlp, v.mlp_norm, eps, name="mlp")
        x = x + gain("gamma_mlp", mlp(y)) + adapter("adapter_mlp", y)
        return constrain(x, TOKEN_AXES), None


class Blocks(nn.Module):
    """`depth` blocks, either scanned (compile time independent of depth) or unrolled.

    `remat` is `none` or a key of REMAT_POLICIES; it trades recomputation for activation memory.
    `attention` is the blocks' attention kernel (Attention.kernel).
    """

    depth: int
    heads: int
    mlp_dim: int
    scan: bool  # the tower's shared settings (TowerSettings): no defaults here
    remat: str
    activation: str
    ln_eps: float
    dtype: Dtype
    attention: str
    causal: bool = False
    adapter_dim: int = 0
    adapter_grid: tuple[int, int] | None = None
    variant: BlockVariant = BlockVariant()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        bias: jax.Array | None = None,
        segment_ids: tuple[jax.Array, jax.Array] | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        block = Block
        if self.remat != "none":
            block = nn.remat(block, policy=remat_policy(self.remat), prevent_cse=not self.scan)
        kwargs = dict(
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            causal=self.causal,
            adapter_dim=self.adapter_dim,
            adapter_grid=self.adapter_grid,
            activation=self.activation,
            ln_eps=self.ln_eps,
            dtype=self.dtype,
            attention=self.attention,
            variant=self.variant,
        )
        if self.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(**kwargs, name="blocks")(x, bias, segment_ids, rope)
        else:
            for i in range(self.depth):
                x, _ = block(**kwargs, name=f"block_{i}")(x, bias, segment_ids, rope)
        return x
