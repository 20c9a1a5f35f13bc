"""A sequence split into contiguous parts over a mesh axis: the collectives attention needs.

Inside a `jax.shard_map` whose inputs are split along the sequence, each device holds positions
`[index * C, (index + 1) * C)` of a sequence of `L = shards * C`. `ContextSplit` names the mesh
axis (or axes) and the number of parts, and wraps the few collectives that context-parallel
attention uses. `WHOLE` is the unsplit sequence: every collective is the identity, so the same
code computes the single-device function.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.sharding import MeshAxes


@dataclasses.dataclass(frozen=True)
class ContextSplit:
    """The sequence split into `shards` contiguous parts over mesh axis `axis` (in shard_map)."""

    axis: MeshAxes = None
    shards: int = 1

    def __post_init__(self):
        if self.shards < 1 or (self.shards > 1) != (self.axis is not None):
            raise ValueError(f"ContextSplit needs a mesh axis iff shards > 1, got {self}")

    def index(self) -> jax.Array:
        """This device's part, as an int32 scalar (0 for `WHOLE`)."""
        if self.shards == 1:
            return jnp.int32(0)
        return jax.lax.axis_index(self.axis).astype(jnp.int32)

    def gather(self, x: jax.Array, axis: int) -> jax.Array:
        """The parts of `x` concatenated along `axis`, in part order, on every device."""
        if self.shards == 1:
            return x
        return jax.lax.all_gather(x, self.axis, axis=axis, tiled=True)

    def psum(self, x: jax.Array) -> jax.Array:
        return x if self.shards == 1 else jax.lax.psum(x, self.axis)

    def pmax(self, x: jax.Array) -> jax.Array:
        return x if self.shards == 1 else jax.lax.pmax(x, self.axis)

    def rows(self, x: jax.Array, positions: np.ndarray) -> jax.Array:
        """x[:, positions] of the whole sequence from each device's part x [B, C, ...].

        `positions` are static and sorted. Each device contributes the rows it holds (a static
        number of slots per device), so only those rows cross devices.
        """
        chunk = x.shape[1]
        owner = positions // chunk
        counts = np.bincount(owner, minlength=self.shards)
        slots = max(int(counts.max()), 1)
        table = np.zeros((self.shards, slots), np.int32)  # local row of each device's slot
        order = np.empty(len(positions), np.int64)  # gathered slot of each position
        for p in range(self.shards):
            mine = np.flatnonzero(owner == p)
            table[p, : len(mine)] = positions[mine] - p * chunk
            order[mine] = p * slots + np.arange(len(mine))
        local = jnp.take(x, jnp.asarray(table)[self.index()], axis=1)
        return jnp.take(self.gather(local, axis=1), jnp.asarray(order), axis=1)


WHOLE = ContextSplit()
