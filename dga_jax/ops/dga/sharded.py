"""Attention per device shard: `jax.shard_map` at the kernel boundary, nowhere else.

XLA cannot partition a Pallas call, and DGA's selection is per (batch, KV head): both are
embarrassingly parallel over batch and heads. Under a mesh, `per_shard` hands each device its
batch x heads slice with the whole sequence, so kernels and the XLA walk see local shapes (their
trip counts no longer reduce across devices). A sequence sharded on the way in is gathered at
the boundary (the attention is not context-parallel) and re-sharded by the caller's constraints.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from dga_jax.sharding import MeshAxes


def per_shard(
    attention: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    batch: MeshAxes,
    heads: MeshAxes,
) -> jax.Array:
    """`attention(q, k, v)` on each device's slice: q [B, L, Hq, D], k/v [B, L, Hkv, D].

    `batch` and `heads` name the mesh axes that split B and the heads (query and KV heads
    alike, so each device keeps whole GQA groups). The mesh is the one `jax.set_mesh` sets;
    without one it is a plain call.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attention(q, k, v)
    for name, axes, size in (("batch", batch, q.shape[0]), ("KV heads", heads, k.shape[2])):
        shards = shard_count(axes)
        if size % shards:
            raise ValueError(
                f"attention shards {name} ({size}) over mesh axes {axes!r} of {shards} devices: "
                f"{name} must be a multiple of {shards}"
            )
    spec = PartitionSpec(batch, None, heads, None)
    q, k, v = (jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v))
    sharded = jax.shard_map(attention, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return sharded(q, k, v)


def shard_count(axes: MeshAxes) -> int:
    """How many parts `axes` of the current mesh (`jax.set_mesh`) split a dimension into."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [name for name in names if name not in mesh.shape]
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not in the mesh {dict(mesh.shape)}")
    return math.prod(mesh.shape[name] for name in names)
