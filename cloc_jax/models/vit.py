"""ViT image tower that returns both the pooled embedding and the token grid.

The grid (before the final norm and pooling) is what region heads read: the CLOC Prompter and
RoIAlign both pool regions from it, so one image forward serves every box prompt.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cloc_jax.boxes import cell_coverage
from cloc_jax.models import rotary
from cloc_jax.models.clustering import cluster, num_clusters, unfold
from cloc_jax.models.layers import (
    TOKEN_AXES,
    Attention,
    Blocks,
    BlockVariant,
    Dtype,
    Mlp,
    TowerSettings,
    constrain,
    layer_norm,
    logical,
)
from cloc_jax.models.region_pool import roi_align
from cloc_jax.models.spec import ImageSpec

# name -> (width, depth, heads, mlp_dim); patch size comes after the slash: "B/16".
VARIANTS = {
    "mu": (128, 4, 4, 512),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "So400m": (1152, 27, 16, 4304),
}
POOLS = ("cls", "map", "gap")
ROI_SIZE = 4  # RoIAlign bins per side (2 samples each), averaged into one region token


@dataclasses.dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int


def vit_size(variant: str, width: int = 0, depth: int = 0, heads: int = 0, mlp_dim: int = 0) -> ViTSize:
    """Parses "B/16" into sizes; nonzero `width`... override the table, and with all four given the name is free
    ("custom/14"), as imported checkpoints need. One-line error on unknown names."""
    name, _, patch = variant.partition("/")
    free = all((width, depth, heads, mlp_dim))
    if (name not in VARIANTS and not free) or not patch.isdigit():
        raise ValueError(f"unknown ViT variant {variant!r}; use <name>/<patch> with name in {sorted(VARIANTS)}")
    table = VARIANTS.get(name, (0, 0, 0, 0))
    sizes = [given or default for given, default in zip((width, depth, heads, mlp_dim), table, strict=True)]
    return ViTSize(*sizes, patch=int(patch))


POSEMB_RESIZES = ("bilinear", "bicubic", "zoom", "bicubic_antialias")


def _torch_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of torch's bicubic interpolation (align_corners=False, A = -0.75, edge
    indices clamped, no antialiasing): what transformers and open_clip resize position embeddings with."""
    a, out = -0.75, np.zeros((size_out, size_in))
    for i in range(size_out):
        src = (i + 0.5) * size_in / size_out - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        ws = [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        ]
        for k, weight in enumerate(ws):
            out[i, min(max(x0 - 1 + k, 0), size_in - 1)] += weight
    return out


def _torch_bicubic_antialias_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of torch's antialiased bicubic interpolation (F.interpolate(antialias=True):
    PIL's filter, A = -0.5, widened by the scale when shrinking, each row normalised): timm's
    resample_abs_pos_embed, which EVA-02 and PE use at another resolution."""

    def cubic(x: float, a: float = -0.5) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    scale = size_in / size_out
    support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1 else (2.0, 1.0)
    out = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size_in)
        weights = np.array([cubic((j - centre + 0.5) * inv) for j in range(lo, hi)])
        out[i, lo:hi] = weights / weights.sum()
    return out


def _linear_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of linear interpolation with the corners aligned: scipy.ndimage.zoom(order=1),
    which big_vision's resample_posemb uses."""
    out = np.zeros((size_out, size_in))
    for i in range(size_out):
        src = i * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        x0 = min(int(np.floor(src)), size_in - 1)
        t = src - x0
        out[i, x0] += 1 - t
        if t:
            out[i, x0 + 1] += t
    return out


def resize_posemb(posemb: jax.Array, grid: tuple[int, int], method: str = "bilinear") -> jax.Array:
    """Resizes a learned [h, w, D] position embedding to `grid` (any resolution): "bilinear" as big_vision
    (jax.image.resize), "bicubic" as transformers' interpolate_pos_encoding and open_clip (torch's kernel;
    open_clip antialiases when shrinking, which this does not), "zoom" as big_vision loads a checkpoint at
    another resolution (scipy.ndimage.zoom, order 1), "bicubic_antialias" as timm (EVA-02, PE)."""
    if method not in POSEMB_RESIZES:
        raise ValueError(f"model.image.posemb_resize={method!r}; choose one of {POSEMB_RESIZES}")
    if posemb.shape[:2] == tuple(grid):
        return posemb
    if method == "bilinear":
        return jax.image.resize(posemb, (*grid, posemb.shape[-1]), method="bilinear")
    matrix = dict(bicubic=_torch_bicubic_matrix, zoom=_linear_corners_matrix)
    matrix = matrix.get(method, _torch_bicubic_antialias_matrix)
    rows = jnp.asarray(matrix(posemb.shape[0], grid[0]), posemb.dtype)
    cols = jnp.asarray(matrix(posemb.shape[1], grid[1]), posemb.dtype)
    return jnp.einsum("ih,jw,hwd->ijd", rows, cols, posemb, precision="highest")


class MapHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens [B, N, D] -> [B, D].

    With `bias` [B, M, N] (log-weights over the tokens) the probe attends once per row -> [B, M, D]: the
    same head pooling inside M boxes (a box-coverage bias keeps each row's attention in its box)."""

    heads: int
    mlp_dim: int
    activation: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        probe = self.param(
            "probe", logical(nn.initializers.xavier_uniform(), (None, None, "embed")), (1, 1, x.shape[-1])
        )
        rows = 1 if bias is None else bias.shape[1]
        probe = jnp.broadcast_to(probe, (x.shape[0], rows, x.shape[-1])).astype(x.dtype)
        y = Attention(self.heads, dtype=self.dtype, name="attn")(probe, x, None if bias is None else bias[:, None])
        y = y + Mlp(self.mlp_dim, self.dtype, self.activation, name="mlp")(layer_norm("ln", self.dtype, self.ln_eps)(y))
        return y[:, 0] if bias is None else y


def coverage_bias(coverage: jax.Array) -> jax.Array:
    """Box coverage [B, M, N] (rows sum to 1) -> attention log-weights: attending with it weighs each token
    by its share of the box; tokens outside the box (and every token of an empty box) get -1e9."""
    return jnp.where(coverage > 0, jnp.log(jnp.maximum(coverage, 1e-30)), -1e9)


def _check_clustering(ratio: float, layer: int, depth: int, tokens: int) -> None:
    num_clusters(tokens, ratio)  # validates the ratio
    if ratio > 0 and not 0 < layer < depth:
        raise ValueError(f"cluster_layer={layer} must be between 1 and depth - 1 = {depth - 1}")


class ViT(nn.Module):
    """Images [B, H, W, 3] in [-1, 1] -> (embedding [B, out_dim], token grid [B, H/p, W/p, width]).

    The architecture knobs (activation, LayerNorm epsilon, ln_pre, patch and projection biases, no
    projection, free sizes, pixel normalisation, position-embedding resizing; EVA-02's and PE's 2D rotary
    positions, block variants and class token beside a MAP head) let imported CLIP, SigLIP, open_clip,
    EVA-02-CLIP and PE-Core towers compute exactly what they compute in their own libraries; the defaults are
    big_vision's ViT. With `hidden_layers` = k >= 0, returns the tokens [B, T, width] (class token first)
    after the first k blocks, which is transformers' `hidden_states[k]` (`Encoder.image_features`).
    """

    spec: ImageSpec  # the architecture, with posemb_grid resolved (build.py)
    tower: TowerSettings
    region_pool: str = "coverage"  # how boxes pool the grid: the region head's `image_pool`
    hidden_layers: int = -1  # >= 0: return the tokens after that many blocks (`Encoder.image_features`)

    def size(self) -> ViTSize:
        return vit_size(self.spec.variant, self.spec.width, self.spec.depth, self.spec.heads, self.spec.mlp_dim)

    @nn.compact
    def __call__(self, images: jax.Array, boxes: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (embedding [B, out_dim], grid [B, h, w, D], box-pooled embeddings [B, M, out_dim] or None).

        Boxes [B, M, 4] (xyxy in [0, 1]) pool the grid. "coverage" (the CLIP-only baseline) runs the
        image's own head inside each box, tokens weighted by how much of their cell the box covers: the MAP
        head attending with a coverage bias (`pool="map"`), else the coverage-weighted mean of the normed
        tokens (`gap`'s mean restricted to the box; for `cls` the nearest box-local counterpart of the class
        token). "roi_align" is UMG-CLIP's RoIAlign on the token grid, then the norm and projection.
        """
        if self.spec.pool not in POOLS:
            raise ValueError(f"pool={self.spec.pool!r}; choose one of {POOLS}")
        size = self.size()
        x, (h, w), num_prefix = self._embed(images, size)
        x = self._encode(x, size, num_prefix, (h, w))
        if self.hidden_layers >= 0:
            return x
        grid = x[:, num_prefix:].reshape(x.shape[0], h, w, size.width)
        ln_post = layer_norm("ln_post", self.tower.dtype, self.tower.ln_eps)
        x = ln_post(x)
        head = None
        if self.spec.pool == "cls":
            pooled = x[:, 0]
        elif self.spec.pool == "gap":
            pooled = x.mean(axis=1)
        else:
            t = self.tower
            heads = self.spec.map_heads or size.heads
            head = MapHead(heads, size.mlp_dim, t.activation, t.ln_eps, t.dtype, name="map_head")
            pooled = head(x)
        proj = self._projection()
        regions = None
        if boxes is not None and self.region_pool == "roi_align":
            scale = jnp.array([w, h, w, h], jnp.float32)
            regions = proj(ln_post(roi_align(grid, boxes * scale, ROI_SIZE).mean(axis=(2, 3))))
        elif boxes is not None:
            coverage, tokens = cell_coverage(boxes, h, w).astype(x.dtype), x[:, num_prefix:]
            if head is not None:
                regions = proj(head(tokens, coverage_bias(coverage)))
            else:
                regions = proj(jnp.einsum("bmn,bnd->bmd", coverage, tokens))
        return proj(pooled), grid, regions

    def _embed(self, images: jax.Array, size: ViTSize) -> tuple[jax.Array, tuple[int, int], int]:
        """[B, H, W, 3] in [-1, 1] -> (tokens [B, T, D] before the blocks, the patch grid (h, w), how many prefix
        tokens come first: 1 for the class token, else 0). Pixels are normalised as the checkpoint was trained."""
        if (self.spec.pixel_mean, self.spec.pixel_std) != ((0.5,) * 3, (0.5,) * 3):
            images = ((images + 1) / 2 - jnp.asarray(self.spec.pixel_mean)) / jnp.asarray(self.spec.pixel_std)
        x = nn.Conv(
            size.width,
            (size.patch, size.patch),
            strides=(size.patch, size.patch),
            padding="VALID",
            use_bias=self.spec.patch_bias,
            dtype=self.tower.dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(images.astype(self.tower.dtype))
        batch, h, w, width = x.shape
        posemb = self.param(
            "pos_embedding",
            logical(nn.initializers.normal(0.02), (None, None, "embed")),
            (self.spec.posemb_grid, self.spec.posemb_grid, width),
        )
        posemb = resize_posemb(posemb, (h, w), self.spec.posemb_resize)
        x = (x + posemb.astype(self.tower.dtype)).reshape(batch, h * w, width)
        num_prefix = 0
        if self.spec.pool == "cls" or self.spec.class_token:  # (its position embedding is folded into it)
            cls = self.param("cls", logical(nn.initializers.zeros, (None, None, "embed")), (1, 1, width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)).astype(x.dtype), x], axis=1)
            num_prefix = 1
        if self.spec.ln_pre:
            x = layer_norm("ln_pre", self.tower.dtype, self.tower.ln_eps)(x)
        return constrain(x, TOKEN_AXES), (h, w), num_prefix

    def _projection(self):
        """The pooled features -> the joint space [.., out_dim] (the identity for a tower without projection)."""
        if not self.spec.project:
            return lambda y: y
        return nn.Dense(
            self.tower.out_dim,
            use_bias=self.spec.proj_bias,
            dtype=self.tower.dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "joint")),
            bias_init=logical(nn.initializers.zeros, ("joint",)),
            name="proj",
        )

    def _encode(self, x: jax.Array, size: ViTSize, num_prefix: int, grid: tuple[int, int]) -> jax.Array:
        """The transformer, with token clustering after `cluster_layer` when `cluster_ratio` > 0. With rotary
        embeddings a merged token rotates by its members' mean position (what merging does to its features)."""
        s = self.spec
        variant = BlockVariant(s.mlp, s.mlp_norm, s.attn_norm, s.key_bias, s.layer_scale)
        blocks = dict(
            heads=size.heads, mlp_dim=size.mlp_dim, scan=self.tower.scan, remat=self.tower.remat, dtype=self.tower.dtype
        )
        blocks.update(activation=self.tower.activation, ln_eps=self.tower.ln_eps, attention=self.tower.attention)
        blocks.update(variant=variant)
        positions = None
        if s.rope_grid:
            positions = jnp.asarray(rotary.grid_positions(grid, s.rope_grid, s.rope_offset, s.rope_order))[None]

        def rope(positions: jax.Array | None):
            if positions is None:
                return None
            return rotary.tables(positions, size.width // size.heads, num_prefix, s.rope_temperature)

        if self.hidden_layers >= 0:  # the first k blocks only (their parameters sliced by the caller when scanned)
            if s.cluster_ratio:
                raise ValueError("image_features needs a model without token clustering (cluster_ratio=0)")
            size = dataclasses.replace(size, depth=self.hidden_layers)
            if size.depth == 0:
                return x
        _check_clustering(s.cluster_ratio, s.cluster_layer, size.depth, x.shape[1] - num_prefix)
        if s.cluster_ratio == 0:
            adapters = dict(adapter_dim=s.adapter_dim, adapter_grid=grid)
            return Blocks(size.depth, **blocks, **adapters, name="encoder")(x, rope=rope(positions))
        if s.adapter_dim:
            raise ValueError("adapters need the full token grid: set cluster_ratio=0 for adaptation")
        x = Blocks(s.cluster_layer, **blocks, name="encoder")(x, rope=rope(positions))
        prefix, tokens = x[:, :num_prefix], x[:, num_prefix:]
        merged, assign, log_sizes = cluster(
            tokens, s.cluster_ratio, knn=s.cluster_knn, grid=grid, spatial=s.cluster_spatial
        )
        if positions is not None:  # [B, K, 2]: each cluster's mean member position
            positions = jnp.einsum("bnk,nc->bkc", assign.astype(jnp.float32), positions[0])
            positions = positions / jnp.exp(log_sizes)[..., None]
        log_sizes = jnp.concatenate([jnp.zeros((x.shape[0], num_prefix)), log_sizes], axis=1)
        y = jnp.concatenate([prefix, merged], axis=1)
        y = Blocks(size.depth - s.cluster_layer, **blocks, name="encoder_clustered")(
            y, log_sizes[:, None, None, :], rope=rope(positions)
        )
        tokens = unfold(y[:, num_prefix:], assign, s.cluster_unfold, before=(merged, tokens))
        return jnp.concatenate([y[:, :num_prefix], tokens], axis=1)


def merge_clustered_encoder(flat: dict) -> dict:
    """Parameters of a ViT trained with clustering ({"a/b/c": array}) -> the same weights laid out as
    one encoder, for running it without clustering (evaluation, adapter tuning): the layers after the
    clustering point follow the layers before it."""
    tail = "encoder_clustered/"
    out = {k: v for k, v in flat.items() if tail not in k}
    first = len({k.split("encoder/")[1].split("/")[0] for k in out if "encoder/block_" in k})  # unrolled depth
    for key, value in flat.items():
        if tail not in key:
            continue
        if "/blocks/" in key:  # scanned: stack along the layers axis
            base = key.replace(tail, "encoder/")
            out[base] = np.concatenate([np.asarray(out[base]), np.asarray(value)], axis=0)
        else:  # unrolled: block_i after the clustering point becomes block_(first + i)
            prefix, rest = key.split(tail + "block_")
            index, rest = rest.split("/", 1)
            out[f"{prefix}encoder/block_{int(index) + first}/{rest}"] = value
    return out


def split_clustered_encoder(flat: dict, layer: int) -> dict:
    """The inverse of `merge_clustered_encoder` for unrolled parameters: the image encoder's blocks -> the layout
    of a model that clusters after `layer` blocks (block_i for i >= layer becomes encoder_clustered/block_(i -
    layer)), so a model trained or imported without clustering starts a clustering run (UMG-CLIP from EVA-02)."""
    out, head = {}, "image/encoder/block_"
    for key, value in flat.items():
        if not key.startswith(head):
            out[key] = value
            continue
        index, rest = key.removeprefix(head).split("/", 1)
        i = int(index)
        out[f"{head}{i}/{rest}" if i < layer else f"image/encoder_clustered/block_{i - layer}/{rest}"] = value
    return out
