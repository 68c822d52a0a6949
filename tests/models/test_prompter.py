import jax
import jax.numpy as jnp
import numpy as np

from cloc_jax.boxes import cell_coverage
from cloc_jax.models.prompter import Prompter, grid_centres, sincos


def _setup(m=3):
    prompter = Prompter(width=32, out_dim=16)
    grid = jax.random.normal(jax.random.key(1), (2, 4, 4, 32))
    boxes = jnp.tile(jnp.array([0.1, 0.2, 0.5, 0.9]), (2, m, 1)) * jnp.arange(1, m + 1)[None, :, None] / m
    texts = jax.random.normal(jax.random.key(2), (2, m, 16))
    variables = prompter.init(jax.random.key(0), grid, boxes, texts)
    return prompter, variables, grid, boxes, texts


def test_sincos_reference():
    points = np.array([[0.25, 0.75]])
    got = np.asarray(sincos(jnp.asarray(points), 8))
    freqs = 10_000.0 ** (-np.arange(2) / 2)
    want = []
    for v in points[0]:
        angles = 2 * np.pi * v * freqs
        want += [*np.sin(angles), *np.cos(angles)]
    np.testing.assert_allclose(got[0], want, atol=1e-6)
    np.testing.assert_allclose(grid_centres(2, 2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])


def test_shapes_and_boxes_are_valid():
    prompter, variables, grid, boxes, texts = _setup()
    regions, pred = prompter.apply(variables, grid, boxes, texts)
    assert regions.shape == (2, 3, 16) and pred.shape == (2, 3, 4)
    pred = np.asarray(pred)
    assert (pred >= 0).all() and (pred <= 1).all() and (pred[..., 2:] >= pred[..., :2]).all()


def test_each_prompt_is_independent_so_padding_changes_nothing():
    prompter, variables, grid, boxes, texts = _setup()
    a, ga = prompter.apply(variables, grid, boxes, texts)
    b, gb = prompter.apply(
        variables, grid, boxes.at[:, 2].set(jnp.array([0.9, 0.0, 0.95, 0.3])), texts.at[:, 2].set(5.0)
    )
    np.testing.assert_allclose(a[:, :2], b[:, :2], atol=1e-6)
    np.testing.assert_allclose(ga[:, :2], gb[:, :2], atol=1e-6)
    assert not np.allclose(a[:, 2], b[:, 2])
    # And the result does not depend on how many prompts share the image forward.
    one, _ = prompter.apply(variables, grid, boxes[:, :1], texts[:, :1])
    np.testing.assert_allclose(one[:, 0], a[:, 0], atol=1e-6)


def test_region_embedding_reads_the_image_inside_the_box():
    prompter, variables, grid, boxes, texts = _setup()
    a, _ = prompter.apply(variables, grid, boxes, texts)
    noise = 3.0 * jax.random.normal(jax.random.key(9), (32,))  # not a constant: layer norm would remove it
    inside, _ = prompter.apply(variables, grid.at[:, 1, 1].add(noise), boxes, texts)  # in the third box only
    outside, _ = prompter.apply(variables, grid.at[:, 3, 3].add(noise), boxes, texts)  # in no box
    assert np.abs(inside[:, 2] - a[:, 2]).max() > 1e-2
    np.testing.assert_allclose(outside, a, atol=1e-3)


def test_prompter_matches_a_full_single_layer_encoder_on_the_prompt_rows():
    """The shortcut (prompt rows only, shared image keys) equals attention over [prompt; image] tokens."""
    prompter, variables, grid, boxes, _ = _setup(m=1)
    params = jax.tree.map(lambda x: getattr(x, "value", x), variables["params"], is_leaf=lambda x: hasattr(x, "value"))

    def full(grid, prompts):
        bound = prompter.bind({"params": params})
        n = grid.shape[1] * grid.shape[2]
        img = grid.reshape(2, n, 32) + bound.key_pos(sincos(grid_centres(4, 4), 32))
        seq_kv = jnp.concatenate([bound.ln_kv(img), bound.ln_q(prompts)], axis=1)  # [B, N + P, D]
        q = bound.query(bound.ln_q(prompts))
        bias = jnp.concatenate([jnp.log(cell_coverage(boxes, 4, 4)[:, 0] + 1e-6), jnp.zeros((2, 2))], axis=-1)
        att = jax.nn.softmax(jnp.einsum("bpd,bsd->bps", q, bound.key(seq_kv)) / np.sqrt(32) + bias[:, None], -1)
        x = prompts + bound.out(jnp.einsum("bps,bsd->bpd", att, bound.value(seq_kv)))
        x = x + bound.mlp(bound.ln_mlp(x))
        return bound.proj(bound.ln_out(x.mean(1)))

    prompts = prompter.apply(variables, boxes, method=Prompter.box_prompts)
    memory = prompter.apply(variables, grid, method=Prompter.memory)
    pooled, _ = prompter.apply(variables, memory, prompts, grid.shape[1:3], boxes, method=Prompter.pool)
    got = prompter.apply(variables, pooled, method=Prompter.embed)
    np.testing.assert_allclose(got[:, 0], full(grid, prompts[:, 0]), atol=1e-5)


def test_box_head_starts_from_the_attended_cells():
    prompter, variables, *_ = _setup(m=1)
    attention = np.zeros((2, 1, 16), np.float32)
    attention[:, 0, [0, 1, 4, 5]] = 0.25  # the top-left 2x2 cells of the 4x4 grid
    pooled = jnp.zeros((2, 1, 32))
    pred = np.asarray(prompter.apply(variables, pooled, jnp.asarray(attention), (4, 4), method=Prompter.box_head))
    # Zero-initialised correction: centre (0.25, 0.25); cell centres 0.125 and 0.375 have variance 1/64.
    half = np.sqrt(12 / 64) / 2
    np.testing.assert_allclose(pred[0, 0], [0.25 - half, 0.25 - half, 0.25 + half, 0.25 + half], atol=1e-5)


def test_box_prompts_attend_inside_their_box():
    prompter, variables, grid, *_ = _setup(m=1)
    box = jnp.array([[[0.0, 0.0, 0.5, 0.5]]] * 2)
    prompts = prompter.apply(variables, box, method=Prompter.box_prompts)
    memory = prompter.apply(variables, grid, method=Prompter.memory)
    _, attention = prompter.apply(variables, memory, prompts, grid.shape[1:3], box, method=Prompter.pool)
    attention = np.asarray(attention).reshape(2, 4, 4)
    assert (attention[:, :2, :2].sum((1, 2)) > 0.99 * attention.sum((1, 2))).all()
