import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloc_jax.models.vit import POOLS, VARIANTS, resize_posemb, vit_size
from tests.conftest import make_vit


def shapes(model, images):
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return jax.eval_shape(model.apply, variables, images)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("patch", [14, 16])
def test_every_variant_returns_embedding_and_grid(name, patch):
    size = vit_size(f"{name}/{patch}")
    side = patch * 4
    model = make_vit(variant=f"{name}/{patch}", posemb_grid=4, out_dim=64)
    emb, grid, _ = shapes(model, jnp.zeros((2, side, side, 3)))
    assert emb.shape == (2, 64)
    assert grid.shape == (2, 4, 4, size.width)


def _float64(variables) -> dict:
    return jax.tree.map(
        lambda x: np.asarray(x.value, np.float64), variables["params"], is_leaf=lambda x: hasattr(x, "value")
    )


@pytest.mark.parametrize("pool", POOLS)
def test_pools_share_the_grid_without_prefix_tokens(pool):
    """The grid is the encoder's output without the class token, and each pool is its head on the encoder's
    output, against float64 NumPy: cls projects ln_post(class token), gap the mean of ln_post(grid tokens),
    map the MAP head's probe attending over ln_post(grid tokens)."""
    model = make_vit(variant="mu/8", pool=pool, posemb_grid=4, out_dim=16)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    (emb, grid, _), state = model.apply(
        variables, images, capture_intermediates=lambda m, _: m.name == "encoder", mutable=["intermediates"]
    )
    assert emb.shape == (2, 16) and grid.shape == (2, 4, 4, 128)
    encoded = np.asarray(state["intermediates"]["encoder"]["__call__"][0], np.float64)  # [B, prefix + 16, D]
    prefix = int(pool == "cls")
    assert encoded.shape == (2, prefix + 16, 128)
    np.testing.assert_array_equal(np.asarray(grid, np.float64).reshape(2, 16, 128), encoded[:, prefix:])
    p = _float64(variables)
    normed = _layer_norm(encoded, p["ln_post"])
    mean = normed[:, prefix:].mean(axis=1)
    if pool == "cls":
        pooled = normed[:, 0]
    elif pool == "gap":
        pooled = mean
    else:
        pooled = np.stack([_map_head(tokens, np.ones(16), p["map_head"]) for tokens in normed])
    np.testing.assert_allclose(emb, pooled @ p["proj"]["kernel"], rtol=1e-4, atol=1e-5)
    if pool != "gap":  # a head that fell back to the mean would pass the shapes above
        assert np.abs(np.asarray(emb) - mean @ p["proj"]["kernel"]).max() > 1e-2


def test_any_resolution_uses_interpolated_position_embeddings():
    model = make_vit(variant="mu/8", posemb_grid=4, out_dim=16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    _, grid, _ = model.apply(variables, jnp.zeros((1, 56, 40, 3)))
    assert grid.shape == (1, 7, 5, 128)


def _bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling, float64, one output pixel at a time."""
    h, w, d = x.shape
    out = np.zeros((out_h, out_w, d))
    for i in range(out_h):
        for j in range(out_w):
            y = min(max((i + 0.5) * h / out_h - 0.5, 0), h - 1)
            z = min(max((j + 0.5) * w / out_w - 0.5, 0), w - 1)
            y0, z0 = int(np.floor(y)), int(np.floor(z))
            y1, z1 = min(y0 + 1, h - 1), min(z0 + 1, w - 1)
            fy, fz = y - y0, z - z0
            out[i, j] = (
                x[y0, z0] * (1 - fy) * (1 - fz)
                + x[y0, z1] * (1 - fy) * fz
                + x[y1, z0] * fy * (1 - fz)
                + x[y1, z1] * fy * fz
            )
    return out


def test_posemb_interpolation_matches_bilinear_reference():
    x = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    got = np.asarray(resize_posemb(jnp.asarray(x), (7, 9)))
    np.testing.assert_allclose(got, _bilinear_reference(x.astype(np.float64), 7, 9), atol=1e-5)


def test_posemb_same_grid_is_identity():
    x = jnp.arange(24.0).reshape(2, 4, 3)
    assert resize_posemb(x, (2, 4)) is x


def test_unknown_variant_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown ViT variant 'XL/16'"):
        vit_size("XL/16")


def test_cell_coverage_is_the_covered_share_of_each_cell():
    from cloc_jax.boxes import cell_coverage

    # A 2x2 grid; the box covers all of cell (0, 0) and half of cell (0, 1).
    w = np.asarray(cell_coverage(jnp.array([[[0.0, 0.0, 0.75, 0.5]]]), 2, 2))[0, 0]
    np.testing.assert_allclose(w, np.array([0.25, 0.125, 0.0, 0.0]) / 0.375, atol=1e-6)


def _layer_norm(x, p, eps=1e-6):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _map_head(tokens, weights, p):
    """NumPy float64 MAP head: the probe attends over `tokens` [N, D] with attention ∝ weights [N] x exp(qk)."""
    a = p["attn"]
    q = np.einsum("d,dhk->hk", p["probe"][0, 0], a["query"]["kernel"]) + a["query"]["bias"]
    k = np.einsum("nd,dhk->nhk", tokens, a["key"]["kernel"]) + a["key"]["bias"]
    v = np.einsum("nd,dhk->nhk", tokens, a["value"]["kernel"]) + a["value"]["bias"]
    logits = np.einsum("hk,nhk->hn", q, k) / np.sqrt(q.shape[-1])
    attn = weights * np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = np.einsum("hkd,hk->d", a["out"]["kernel"], np.einsum("hn,nhk->hk", attn, v)) + a["out"]["bias"]
    h = _layer_norm(y, p["ln"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    return y + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


@pytest.mark.parametrize("pool", POOLS)
def test_box_pooling_is_the_image_head_applied_to_the_covered_tokens(pool):
    """A CLIP-only model's region goes through the head its image embedding goes through: the MAP head
    attending only inside the box (tokens weighted by coverage), or the mean of the normed tokens."""
    model = make_vit(variant="mu/8", pool=pool, posemb_grid=4, out_dim=16)
    images = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    # Box 1: exactly token cell (row 1, col 2); box 2: cells (0, 0) and (0, 1) in equal parts; box 3: all.
    boxes = jnp.array([[[0.5, 0.25, 0.75, 0.5], [0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 1.0, 1.0]]])
    emb, grid, regions = model.apply(variables, images, boxes)
    p = _float64(variables)
    tokens = _layer_norm(np.asarray(grid, np.float64)[0].reshape(16, -1), p["ln_post"])
    for row, weights in enumerate([np.eye(16)[6], (np.eye(16)[0] + np.eye(16)[1]) / 2, np.full(16, 1 / 16)]):
        pooled = _map_head(tokens, weights, p["map_head"]) if pool == "map" else weights @ tokens
        np.testing.assert_allclose(regions[0, row], pooled @ p["proj"]["kernel"], atol=1e-4, err_msg=str(row))
    if pool != "cls":  # the whole image as a box is the image embedding
        np.testing.assert_allclose(regions[0, 2], emb[0], atol=1e-5)


@pytest.mark.parametrize("grid", [(7, 9), (2, 3), (3, 5)])
def test_posemb_resizing_matches_the_source_libraries(grid):
    """The "bicubic" method is torch's F.interpolate (what transformers and open_clip use), "bicubic_antialias" is
    torch's antialiased one (timm's resample_abs_pos_embed: EVA-02, PE), growing and shrinking, "zoom" is
    scipy.ndimage.zoom(order=1) (big_vision's resample_posemb)."""
    torch = pytest.importorskip("torch")
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    posemb = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.tensor(posemb).permute(2, 0, 1)[None], size=grid, mode="bicubic", align_corners=False
    )[0].permute(1, 2, 0)
    np.testing.assert_allclose(resize_posemb(jnp.asarray(posemb), grid, "bicubic"), want.numpy(), atol=1e-5)
    smooth = torch.nn.functional.interpolate(
        torch.tensor(posemb).permute(2, 0, 1)[None], size=grid, mode="bicubic", align_corners=False, antialias=True
    )[0].permute(1, 2, 0)
    np.testing.assert_allclose(resize_posemb(jnp.asarray(posemb), grid, "bicubic_antialias"), smooth.numpy(), atol=1e-5)
    zoomed = scipy_ndimage.zoom(posemb.astype(np.float64), (grid[0] / 3, grid[1] / 5, 1), order=1)
    np.testing.assert_allclose(resize_posemb(jnp.asarray(posemb), grid, "zoom"), zoomed, atol=1e-5)
    with pytest.raises(ValueError, match="posemb_resize='nearest'"):
        resize_posemb(jnp.asarray(posemb), grid, "nearest")


def test_rotary_swiglu_tower_under_a_mesh_with_remat_equals_one_device():
    """EVA-02's and PE's knobs together (rotary positions, SwiGLU with its sub-LayerNorm, the attention's
    sub-LayerNorm, no key bias, layer scale, a class token beside a MAP head), scanned and rematerialised, with
    parameters sharded by their logical axes over data 4 x fsdp 2: the embedding and every gradient are the
    single-device ones (to float32 reordering)."""
    import flax.linen as nn

    from cloc_jax import sharding
    from cloc_jax.config import AXIS_RULES
    from cloc_jax.models.layers import TowerSettings
    from cloc_jax.models.spec import ImageSpec
    from cloc_jax.models.vit import ViT

    knobs = dict(mlp="swiglu", mlp_norm=True, attn_norm=True, key_bias=False, layer_scale=True, map_heads=2)
    image = ImageSpec(
        variant="mu/8", posemb_grid=4, pool="map", class_token=True, rope_grid=5, rope_order="xy", **knobs
    )
    settings = dict(out_dim=16, activation="gelu", ln_eps=1e-6, dtype=jnp.float32, attention="xla")
    plain = ViT(image, TowerSettings(**settings, scan=True, remat="none"))
    sharded = ViT(image, TowerSettings(**settings, scan=True, remat="full"))
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    params = nn.unbox(plain.init(jax.random.key(0), images))

    def loss(model):
        return jax.value_and_grad(lambda p, x: jnp.sum(model.apply(p, x)[0] ** 2))

    want_value, want_grad = jax.jit(loss(plain))(params, images)
    mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(AXIS_RULES):
        specs = nn.get_partition_spec(jax.eval_shape(sharded.init, jax.random.key(0), images))
        placed = jax.device_put(params, nn.logical_to_mesh_sharding(specs, mesh, AXIS_RULES))
        assert any(
            len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated for a in jax.tree.leaves(placed)
        )
        value, grad = jax.jit(loss(sharded))(placed, images)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    # float32 sums in another order: every gradient to 1e-5 of the largest gradient entry (some are zero)
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grad))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * largest), grad, want_grad)
