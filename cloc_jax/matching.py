"""Hungarian matching on device: the minimum-cost assignment of targets to queries, under jit, batched by vmap.

Mask2Former matches on the host (scipy's `linear_sum_assignment` on the step's cost matrices); here it runs inside
the step, so a TPU or GPU step never waits for a host round trip, and each device matches its own shard of the
batch (host matching would gather every device's [G, Q] costs to one host per step). The algorithm is the one
scipy runs (Crouse 2016: shortest augmenting paths with dual variables, one target row at a time), written with
fixed-size arrays: each row's Dijkstra search is a `while_loop` over at most Q columns, so G rows cost O(G Q^2)
vector operations of length Q (G, Q <= 100: well under a millisecond of device time per image).
"""

import jax
import jax.numpy as jnp


def _assign_row(cost: jax.Array, row: jax.Array, state: tuple) -> tuple:
    """Adds target `row` to the assignment: the shortest augmenting path from it to a free query, then the duals."""
    u, v, col4row, row4col = state
    n, m = cost.shape

    def search(carry):
        i, low, shortest, path, rows_seen, cols_seen, _ = carry
        rows_seen = rows_seen.at[i].set(True)
        reduced = low + cost[i] - u[i] - v
        better = ~cols_seen & (reduced < shortest)
        path, shortest = jnp.where(better, i, path), jnp.where(better, reduced, shortest)
        open_costs = jnp.where(cols_seen, jnp.inf, shortest)
        lowest = open_costs.min()
        ties = open_costs == lowest
        free = ties & (row4col < 0)  # scipy's tie rule: a free column ends the search first
        j = jnp.where(free.any(), jnp.argmax(free), jnp.argmax(ties))
        cols_seen = cols_seen.at[j].set(True)
        sink = jnp.where(row4col[j] < 0, j, -1)
        return row4col[j], lowest, shortest, path, rows_seen, cols_seen, sink

    start = (
        row,
        jnp.zeros((), cost.dtype),
        jnp.full((m,), jnp.inf, cost.dtype),
        jnp.full((m,), -1, jnp.int32),
        jnp.zeros((n,), bool),
        jnp.zeros((m,), bool),
        jnp.int32(-1),
    )
    _, low, shortest, path, rows_seen, cols_seen, sink = jax.lax.while_loop(lambda c: c[-1] < 0, search, start)
    others = rows_seen & (jnp.arange(n) != row)
    u = jnp.where(others, u + low - shortest[jnp.clip(col4row, 0)], u).at[row].add(low)
    v = jnp.where(cols_seen, v - (low - shortest), v)

    def augment(carry):
        j, col4row, row4col, _ = carry
        i = path[j]
        row4col = row4col.at[j].set(i)
        previous = col4row[i]
        return previous, col4row.at[i].set(j), row4col, i == row

    _, col4row, row4col, _ = jax.lax.while_loop(
        lambda c: ~c[-1], augment, (sink, col4row, row4col, jnp.zeros((), bool))
    )
    return u, v, col4row, row4col


def linear_sum_assignment(cost: jax.Array) -> jax.Array:
    """cost [G, Q] (G <= Q, finite) -> the query matched to each target [G] int32, minimising the summed cost.

    Equals scipy.optimize.linear_sum_assignment(cost)[1] (the assignment, when the optimum is unique). Padding
    targets get a constant row (0 for every query): they take leftover queries without changing the others."""
    n, m = cost.shape
    if n > m:
        raise ValueError(f"{n} targets cannot each get one of {m} queries: use at least as many queries")
    state = (
        jnp.zeros((n,), cost.dtype),
        jnp.zeros((m,), cost.dtype),
        jnp.full((n,), -1, jnp.int32),
        jnp.full((m,), -1, jnp.int32),
    )
    state = jax.lax.fori_loop(0, n, lambda row, s: _assign_row(cost, row, s), state)
    return state[2]
