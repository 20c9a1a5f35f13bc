"""A sequence split over a mesh axis: where each position lives, and the collectives attention
needs.

Inside a `jax.shard_map` whose inputs are split along the sequence, each of P devices holds
C = L / P rows. Contiguous order: device p holds positions `[p * C, (p + 1) * C)`. Zig-zag
order (load balancing for causal attention): the sequence is cut into 2P pieces and device p
holds pieces p and 2P - 1 - p, so every device has as many early as late positions; the data
path permutes each row once (`zigzag_order`) and positions are no longer row indices.
`ContextSplit` names the mesh axis (or axes), the number of parts and the order. `WHOLE` is the
unsplit sequence: every collective is the identity, so the same code computes the
single-device function.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.checks import is_int
from dga_jax.sharding import MeshAxes


@dataclasses.dataclass(frozen=True)
class ContextSplit:
    """The sequence split into `shards` parts over mesh axis `axis` (in shard_map): contiguous,
    or with `zigzag` two pieces per part (`zigzag_order`)."""

    axis: MeshAxes = None
    shards: int = 1
    zigzag: bool = False

    def __post_init__(self):
        names = axis_tuple(self.axis, "ContextSplit's axis")
        if isinstance(self.axis, list):  # hashable, as jit's static arguments must be
            object.__setattr__(self, "axis", names)
        if not is_int(self.shards) or self.shards < 1:
            raise ValueError(f"ContextSplit's shards must be an int >= 1, got {self.shards!r}")
        # One part may name its axis (ContextSplit(axis, mesh.shape[axis]) on a size-1 axis):
        # the sequence is whole, and the ops check the axis holds one device (`check_split`).
        if self.shards > 1 and not names:
            raise ValueError(f"ContextSplit over shards > 1 parts needs a mesh axis, got {self}")
        # A truthy string ("contiguous") would silently permute every position.
        if not isinstance(self.zigzag, bool | np.bool_):
            raise ValueError(f"ContextSplit's zigzag must be a bool, got {self.zigzag!r}")

    @property
    def pieces(self) -> int:
        """Contiguous runs of positions per device: 2 in zig-zag order, else 1."""
        return 2 if self.zigzag and self.shards > 1 else 1

    def order(self, seq_len: int) -> np.ndarray:
        """Position of each row of the device-order sequence (all parts concatenated)."""
        return zigzag_order(seq_len, self.shards) if self.pieces == 2 else np.arange(seq_len)

    def firsts(self, chunk: int) -> list[jax.Array]:
        """First position of each of this device's pieces (int32 scalars); C = chunk rows."""
        span, index = chunk // self.pieces, self.index()
        if self.pieces == 1:
            return [index * chunk]
        return [index * span, (2 * self.shards - 1 - index) * span]

    def positions(self, chunk: int) -> jax.Array:
        """[C] position of each local row."""
        span = chunk // self.pieces
        return jnp.concatenate([f + jnp.arange(span, dtype=jnp.int32) for f in self.firsts(chunk)])

    def piece_rows(self, x: jax.Array) -> list[jax.Array]:
        """x [B, C, ...] cut into this device's pieces along axis 1."""
        span = x.shape[1] // self.pieces
        return [x[:, i * span : (i + 1) * span] for i in range(self.pieces)]

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

    def gather_sequence(self, x: jax.Array, axis: int) -> jax.Array:
        """The whole sequence of `x` along `axis`, in position order, on every device."""
        x = self.gather(x, axis)
        if self.pieces == 1:
            return x
        return jnp.take(x, jnp.asarray(np.argsort(self.order(x.shape[axis]))), axis=axis)

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
        row = np.argsort(self.order(chunk * self.shards))[positions]  # in device order
        owner = row // chunk
        counts = np.bincount(owner, minlength=self.shards)
        slots = max(int(counts.max()), 1)
        table = np.zeros((self.shards, slots), np.int32)  # local row of each device's slot
        order = np.empty(len(positions), np.int64)  # gathered slot of each position
        for p in range(self.shards):
            mine = np.flatnonzero(owner == p)
            table[p, : len(mine)] = row[mine] - p * chunk
            order[mine] = p * slots + np.arange(len(mine))
        local = jnp.take(x, jnp.asarray(table)[self.index()], axis=1)
        return jnp.take(self.gather(local, axis=1), jnp.asarray(order), axis=1)


def axis_tuple(axes, what: str) -> tuple[str, ...]:
    """Mesh axes (None, a name, or a tuple or list of distinct names) as a tuple of names;
    anything else is an error naming `what` (the argument)."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not (
        isinstance(names, tuple | list)
        and all(isinstance(name, str) for name in names)
        and len(set(names)) == len(names)
    ):
        raise ValueError(
            f"{what} must be None, a mesh axis name or a tuple of distinct names, got {axes!r}"
        )
    return tuple(names)


WHOLE = ContextSplit()


def zigzag_order(seq_len: int, parts: int) -> np.ndarray:
    """[L] positions in zig-zag device order: pieces 0, 2P-1, 1, 2P-2, ... of L / 2P each.

    Row i of a zig-zag batch holds position `zigzag_order(L, P)[i]`; device p's C = L / P rows
    are pieces p and 2P - 1 - p.
    """
    if not is_int(parts) or parts < 1:
        raise ValueError(f"zig-zag order needs parts (devices) as an int >= 1, got {parts!r}")
    if seq_len % (2 * parts):
        raise ValueError(
            f"zig-zag order cuts the sequence ({seq_len} positions) into 2 x {parts} pieces: "
            f"the length must be a multiple of {2 * parts} (or use contiguous order)"
        )
    pieces = np.arange(seq_len).reshape(2 * parts, -1)
    return np.concatenate([pieces[i] for p in range(parts) for i in (p, 2 * parts - 1 - p)])


def check_split(split, op: str) -> None:
    """A `ContextSplit`'s part count must be its mesh axes' size (inside `jax.shard_map`; one
    part naming an axis too: a split sequence taken as whole would be attended wrongly); `op`
    names the caller in the errors. Anything else than a `ContextSplit` is refused."""
    if not isinstance(split, ContextSplit):
        raise ValueError(f"split must be a dga_jax ContextSplit, got {split!r}")
    if not split.axis:
        return
    try:
        size = jax.lax.axis_size(split.axis)
    except NameError as e:
        raise ValueError(
            f"split={split} names mesh axes that are not bound: call {op} inside a "
            "jax.shard_map over them"
        ) from e
    if size != split.shards:
        raise ValueError(
            f"split={split} says {split.shards} parts, but mesh axes {split.axis!r} hold {size} "
            f"devices: pass ContextSplit({split.axis!r}, {size})"
        )
