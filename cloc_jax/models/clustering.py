"""Token clustering that reduces, then unfolds (UMG-CLIP, after AiluRus / DPC-kNN).

At an intermediate layer the N tokens are summarised by K = round((1 - r) N) representatives chosen by
density peaks: a token scores high when its k nearest neighbours are close (dense) and every denser
token is far (a peak, not a slope); optionally (AiluRus's spatial awareness) distance on the token grid counts
too, so clusters are compact patches. Each token joins its nearest representative; clusters are merged
by mean, the remaining layers run on K tokens with attention biased by log(cluster size) (a merged
token counts for its members), and at the end every token takes its cluster's output (or, with
"residual" unfolding, adds its cluster's update to its own features), so region heads see the full
grid. All shapes are static (top-k, one-hot assignment matrices, einsums).
"""

import jax
import jax.numpy as jnp


def num_clusters(tokens: int, ratio: float) -> int:
    """K = round((1 - ratio) * tokens); one-line error for a ratio outside [0, 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"cluster ratio r={ratio} must be in [0, 1)")
    return max(1, round((1.0 - ratio) * tokens))


def token_distances(x: jax.Array, grid: tuple[int, int] | None = None, spatial: float = 0.0) -> jax.Array:
    """x [B, N, D] -> pairwise distances [B, N, N]: root-mean-square feature difference, plus (AiluRus's
    spatial awareness) `spatial` x the grid distance rescaled to the feature distances' mean, so that a
    cluster stays a compact patch of the image rather than every patch of similar texture."""
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    dim = x.shape[2]
    sq = jnp.sum(x * x, axis=-1)
    dist = jnp.sqrt(jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2 * x @ x.transpose(0, 2, 1), 0.0) / dim)
    dist = (dist + dist.transpose(0, 2, 1)) / 2  # exactly symmetric: mutual neighbours get equal densities
    dist = jnp.where(jnp.eye(x.shape[1], dtype=bool), 0.0, dist)  # exact zeros where rounding leaves sqrt(eps)
    if spatial == 0.0:
        return dist
    if grid is None or grid[0] * grid[1] != x.shape[1]:
        raise ValueError(f"spatial clustering needs the token grid of {x.shape[1]} tokens, got {grid}")
    rows, cols = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing="ij")
    pos = jnp.stack([rows.ravel(), cols.ravel()], -1).astype(jnp.float32)  # [N, 2], row-major like the tokens
    pos_dist = jnp.sqrt(jnp.sum((pos[:, None] - pos[None]) ** 2, -1))
    scale = jnp.mean(dist, axis=(1, 2), keepdims=True) / jnp.mean(pos_dist)
    return dist + spatial * scale * pos_dist[None]


def density_peak_centres(dist: jax.Array, k: int, knn: int = 5) -> jax.Array:
    """Pairwise distances [B, N, N] -> indices [B, K] of the K density peaks (highest density x
    separation first).

    Density comes from the `knn` nearest neighbours, so an object covering fewer tokens than that
    can never be dense and is absorbed by its surroundings: small grids want a small knn."""
    if knn < 1:
        raise ValueError(f"cluster knn={knn} must be at least 1")
    n = dist.shape[1]
    nearest = -jax.lax.top_k(-dist, min(knn + 1, n))[0][..., 1:]  # k nearest, excluding itself
    density = jnp.exp(-jnp.mean(nearest**2, axis=-1))
    # [B, i, j]: j is denser than i; equal densities (mutual nearest neighbours when knn = 1) go to the
    # later token, exactly, as no float32 nudge could
    later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
    denser = (density[:, None, :] > density[:, :, None]) | ((density[:, None, :] == density[:, :, None]) & later)
    far = jnp.max(dist, axis=-1, keepdims=True)
    separation = jnp.min(jnp.where(denser, dist, far), axis=-1)  # the densest token gets the largest distance
    return jax.lax.top_k(density * separation, k)[1]


def cluster(
    x: jax.Array, ratio: float, knn: int = 5, grid: tuple[int, int] | None = None, spatial: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, N, D] (tokens of a row-major `grid`) -> (merged tokens [B, K, D], assignment one-hot
    [B, N, K], log cluster sizes [B, K]). Peaks and assignment use `token_distances`."""
    k = num_clusters(x.shape[1], ratio)
    dist = token_distances(x, grid, spatial)
    centres = density_peak_centres(dist, k, knn)
    is_centre = jax.nn.one_hot(centres, x.shape[1], dtype=jnp.float32).transpose(0, 2, 1)  # [B, N, K]
    to_centre = jnp.einsum("bnm,bmk->bnk", dist, is_centre)  # a one-hot matmul, not a gather
    to_centre = jnp.where(is_centre > 0, -jnp.inf, to_centre)  # a representative always belongs to its own cluster
    assign = jax.nn.one_hot(jnp.argmin(to_centre, axis=-1), k, dtype=x.dtype)  # [B, N, K]
    sizes = jnp.sum(assign, axis=1)  # [B, K], each >= 1
    merged = jnp.einsum("bnk,bnd->bkd", assign, x) / sizes[..., None]
    return merged, assign, jnp.log(sizes.astype(jnp.float32))


UNFOLDS = ("copy", "residual")


def unfold(
    merged: jax.Array, assign: jax.Array, mode: str = "copy", before: tuple[jax.Array, jax.Array] | None = None
) -> jax.Array:
    """[B, K, D] + assignment [B, N, K] -> [B, N, D].

    "copy": every token takes its cluster's output (UMG-CLIP / AiluRus). "residual": every token keeps
    its own features from the clustering point and adds its cluster's update since — `before` = (the
    merged tokens [B, K, D] as they entered the later layers, the tokens [B, N, D] at that point) — so
    a small object merged into a large cluster still looks like itself to a region head."""
    if mode not in UNFOLDS:
        raise ValueError(f"cluster_unfold={mode!r}; choose one of {UNFOLDS}")
    if mode == "copy":
        return jnp.einsum("bnk,bkd->bnd", assign, merged)
    merged_before, tokens_before = before
    return tokens_before + jnp.einsum("bnk,bkd->bnd", assign, merged - merged_before)
