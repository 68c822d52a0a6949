"""Token clustering: density peaks against a NumPy loop, merge/unfold, the log-size attention bias, ViT."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloc_jax.models.clustering import cluster, density_peak_centres, num_clusters, token_distances, unfold
from cloc_jax.models.layers import Attention
from cloc_jax.models.vit import merge_clustered_encoder, split_clustered_encoder
from tests.conftest import make_vit


def reference_distances(x: np.ndarray, grid: tuple[int, int] | None = None, spatial: float = 0.0) -> np.ndarray:
    """Feature RMS distance plus `spatial` x grid distance rescaled to the feature distances' mean, in loops."""
    n, dim = x.shape
    dist = np.array([[np.linalg.norm(x[i] - x[j]) / np.sqrt(dim) for j in range(n)] for i in range(n)])
    if spatial:
        pos = [(i // grid[1], i % grid[1]) for i in range(n)]
        pos_dist = np.array([[np.hypot(*np.subtract(pos[i], pos[j])) for j in range(n)] for i in range(n)])
        dist = dist + spatial * dist.mean() / pos_dist.mean() * pos_dist
    return dist


def reference_centres(dist: np.ndarray, k: int, knn: int) -> set[int]:
    """DPC-kNN in float64 loops: density from the k nearest neighbours, separation from denser tokens."""
    n = len(dist)
    density = np.array([np.exp(-np.mean(np.sort(dist[i])[1 : knn + 1] ** 2)) for i in range(n)])
    density = density + np.arange(n) * 1e-6 * density.max() / n
    score = []
    for i in range(n):
        denser = [dist[i, j] for j in range(n) if density[j] > density[i]]
        score.append(density[i] * (min(denser) if denser else dist[i].max()))
    return set(np.argsort(score)[::-1][:k].tolist())


@pytest.mark.parametrize("spatial,knn", [(0.0, 4), (1.0, 4), (0.0, 1)])
def test_density_peaks_and_assignment_match_the_reference(spatial, knn):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 40, 8))
    dist = np.asarray(token_distances(jnp.asarray(x, jnp.float32), (5, 8), spatial))
    got = np.asarray(density_peak_centres(jnp.asarray(dist), 10, knn=knn))
    _, assign, _ = cluster(jnp.asarray(x, jnp.float32), 0.75, knn=knn, grid=(5, 8), spatial=spatial)
    for b in range(2):
        want_dist = reference_distances(x[b], (5, 8), spatial)
        np.testing.assert_allclose(dist[b], want_dist, rtol=1e-4, atol=1e-5)
        centres = reference_centres(want_dist, 10, knn)
        assert set(got[b].tolist()) == centres
        centres = sorted(centres, key=got[b].tolist().index)  # in the model's cluster order
        nearest = [i if i in centres else min(centres, key=lambda c: want_dist[i, c]) for i in range(40)]
        assert [centres[c] for c in np.asarray(assign[b]).argmax(-1)] == nearest


def test_spatial_clusters_are_compact_patches_of_the_grid():
    """On texture without structure, feature distance alone scatters a cluster over the image; with the
    grid distance weighed in, each cluster's tokens sit close together."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 64, 16)), jnp.float32)
    pos = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1).reshape(64, 2)

    def mean_spread(spatial: float) -> float:
        labels = np.asarray(cluster(x, 0.75, grid=(8, 8), spatial=spatial)[1][0]).argmax(-1)
        members = [pos[labels == c] for c in set(labels)]
        return np.mean([np.linalg.norm(m - m.mean(0), axis=1).mean() for m in members])

    assert mean_spread(1.0) < 0.5 * mean_spread(0.0)
    with pytest.raises(ValueError, match="spatial clustering needs the token grid of 64 tokens"):
        cluster(x, 0.75, grid=(4, 4), spatial=1.0)


def test_clusters_recover_well_separated_groups_and_merge_by_mean():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 10
    labels = rng.permutation(np.repeat(np.arange(4), 8))  # 32 tokens, 4 groups of 8
    x = centres[labels] + rng.normal(size=(32, 16)) * 0.01
    merged, assign, log_sizes = cluster(jnp.asarray(x[None], jnp.float32), ratio=0.875, knn=3)  # K = 4
    assign = np.asarray(assign[0]).argmax(-1)
    for group in range(4):  # one cluster per group, and the group is whole
        assert len(set(assign[labels == group])) == 1
    assert len(set(assign)) == 4
    np.testing.assert_allclose(np.exp(log_sizes[0]), 8.0, rtol=1e-6)
    for c in range(4):
        np.testing.assert_allclose(merged[0, c], x[assign == c].mean(0), atol=1e-4)
    onehot = jax.nn.one_hot(assign[None], 4)
    unfolded = np.asarray(unfold(merged, onehot))
    np.testing.assert_allclose(unfolded[0], np.asarray(merged[0])[assign], atol=1e-6)
    later = merged + 1.5  # the later layers moved every cluster by the same update
    residual = np.asarray(unfold(later, onehot, "residual", before=(merged, jnp.asarray(x[None], jnp.float32))))
    np.testing.assert_allclose(residual[0], x + 1.5, atol=1e-5)  # each token keeps its own features
    with pytest.raises(ValueError, match="cluster_unfold='mean'; choose one of"):
        unfold(merged, onehot, "mean")


def test_log_size_bias_makes_merged_tokens_count_for_their_members():
    """With identical tokens inside each cluster, attending to K merged tokens biased by log(size)
    is exactly attending to all N tokens."""
    rng = np.random.default_rng(2)
    groups = rng.normal(size=(1, 5, 32)).astype(np.float32)
    sizes = np.array([1, 2, 3, 4, 6])
    full = np.repeat(groups, sizes, axis=1)  # [1, 16, 32]
    queries = rng.normal(size=(1, 3, 32)).astype(np.float32)
    attn = Attention(heads=4)
    params = attn.init(jax.random.key(0), queries, full)
    want = attn.apply(params, queries, full)
    bias = jnp.log(jnp.asarray(sizes, jnp.float32))[None, None, None, :]
    got = attn.apply(params, queries, groups, bias)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_vit_with_clustering_returns_the_full_grid_and_trains():
    vit = make_vit(variant="mu/8", posemb_grid=4, out_dim=16, cluster_ratio=0.75, cluster_layer=2, scan=False)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = vit.init(jax.random.key(0), images)
    assert "encoder_clustered" in params["params"]
    emb, grid, _ = jax.jit(vit.apply)(params, images)
    assert emb.shape == (2, 16) and grid.shape == (2, 4, 4, 128)
    flat = np.asarray(grid).reshape(2, 16, 128)
    assert len({tuple(np.round(t, 5)) for t in flat[0]}) == num_clusters(16, 0.75)  # 4 distinct token outputs
    grads = jax.grad(lambda p: jnp.sum(vit.apply(p, images)[0] ** 2))(params)
    leaves = jax.tree.leaves(grads["params"]["encoder"])
    assert all(np.isfinite(g).all() for g in leaves) and any(np.abs(g).max() > 0 for g in leaves)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(cluster_ratio=1.0), r"cluster ratio r=1.0 must be in \[0, 1\)"),
        (dict(cluster_ratio=-0.5), r"cluster ratio r=-0.5 must be in \[0, 1\)"),
        (dict(cluster_ratio=0.5, cluster_layer=4), "cluster_layer=4 must be between 1 and depth - 1 = 3"),
        (dict(cluster_ratio=0.5, cluster_knn=0), "cluster knn=0 must be at least 1"),
    ],
)
def test_bad_clustering_settings_are_one_line(kwargs, message):
    vit = make_vit(variant="mu/8", posemb_grid=4, out_dim=16, **kwargs)
    with pytest.raises(ValueError, match=message):
        vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("scan", [True, False])
def test_clustered_parameters_merge_into_one_encoder_in_layer_order(scan):
    images = jnp.zeros((1, 32, 32, 3))
    clustered = make_vit(variant="mu/8", posemb_grid=4, out_dim=16, cluster_ratio=0.75, cluster_layer=1, scan=scan)
    plain = make_vit(variant="mu/8", posemb_grid=4, out_dim=16, scan=scan)
    flat = lambda p: flax.traverse_util.flatten_dict(nn.unbox(p)["params"], sep="/")  # noqa: E731
    params = flat(clustered.init(jax.random.key(0), images))
    merged = merge_clustered_encoder(params)
    target = flat(plain.init(jax.random.key(1), images))
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in target.items()}
    if scan:  # the last clustered layer is the last layer
        last, want = merged["encoder/blocks/mlp/fc1/kernel"][-1], params["encoder_clustered/blocks/mlp/fc1/kernel"][-1]
    else:
        last, want = merged["encoder/block_3/mlp/fc1/kernel"], params["encoder_clustered/block_2/mlp/fc1/kernel"]
        # and back: a model without clustering starts a clustering run (init_from) in the clustered layout
        split = split_clustered_encoder({f"image/{k}": v for k, v in merged.items()}, layer=1)
        assert split.keys() == {f"image/{k}" for k in params}
        assert all(np.array_equal(split[f"image/{k}"], v) for k, v in params.items())
    np.testing.assert_array_equal(last, want)
    # the merged weights run as a plain ViT
    assert plain.apply({"params": flax.traverse_util.unflatten_dict(merged, sep="/")}, images)[0].shape == (1, 16)


# EVA-02's and PE's towers (rotary positions, SwiGLU, sub-LayerNorms; PE: a class token beside a MAP head)
ROTARY_TOWERS = {
    "eva02": dict(pool="cls", rope_grid=5, mlp="swiglu", mlp_norm=True, attn_norm=True, key_bias=False),
    "pe": dict(pool="map", class_token=True, rope_grid=4, rope_offset=1.0, rope_order="xy", map_heads=2),
}


@pytest.mark.parametrize("family", list(ROTARY_TOWERS))
def test_clustering_every_token_alone_equals_the_unclustered_rotary_tower(family):
    """With as many clusters as tokens (ratio 0.01 of 16 tokens: each token its own cluster, the clustered code
    path with its reordering, mean positions and size bias), a rotary tower computes what it computes
    unclustered: a merged token rotates by its members' mean position, here its own."""
    images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    common = dict(variant="mu/8", posemb_grid=4, out_dim=16, layer_scale=True, **ROTARY_TOWERS[family])
    clustered = make_vit(cluster_ratio=0.01, cluster_layer=2, cluster_unfold="copy", **common)
    plain = make_vit(**common)
    params = nn.unbox(clustered.init(jax.random.key(0), images))["params"]
    flat = merge_clustered_encoder(flax.traverse_util.flatten_dict(params, sep="/"))
    merged = {"params": flax.traverse_util.unflatten_dict(flat, sep="/")}
    (emb_c, grid_c, _), (emb_p, grid_p, _) = clustered.apply({"params": params}, images), plain.apply(merged, images)
    np.testing.assert_allclose(emb_c, emb_p, atol=1e-5)
    np.testing.assert_allclose(grid_c, grid_p, atol=1e-5)
    assert np.abs(np.asarray(emb_p)).max() > 1e-2  # not a vanishing output
