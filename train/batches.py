"""Batch layout: which global rows a process loads, and the global arrays they become.

A global batch has B rows of T tokens, laid out as [A, B / A, T] for A accumulation steps: row g
is micro-batch g // (B / A), position g % (B / A). The batch axis is sharded over (data, fsdp)
and the sequence over `seq`, so a process may hold a share of the rows or, when sequences are
sharded across hosts, parts of all of them.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding


def addressed_rows(sharding: NamedSharding, shape: tuple[int, int, int]) -> list[int]:
    """Global batch rows that this process's devices hold (sorted)."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        micro = range(*index[0].indices(shape[0]))
        position = range(*index[1].indices(shape[1]))
        rows.update(a * shape[1] + r for a in micro for r in position)
    return sorted(rows)


def global_batch(
    local: dict[str, np.ndarray],
    rows: list[int],
    sharding: NamedSharding,
    shape: tuple[int, int, int],
    order: np.ndarray,
) -> dict[str, jax.Array]:
    """This process's `rows` ([len(rows), T] arrays) -> global [A, B / A, T] arrays.

    Every row is permuted by `order` first (column t holds token `order[t]`): the model's
    `row_positions`, e.g. zig-zag order for context parallelism.
    """
    slot = {row: i for i, row in enumerate(rows)}

    def shard(values: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
        micro = range(*index[0].indices(shape[0]))
        position = range(*index[1].indices(shape[1]))
        picked = np.array([[slot[a * shape[1] + r] for r in position] for a in micro])
        return values[picked][..., order[index[2]]]

    return {
        key: jax.make_array_from_callback(shape, sharding, functools.partial(shard, local[key]))
        for key in ("inputs", "targets")
    }
