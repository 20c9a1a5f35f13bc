"""Attention per device shard: `jax.shard_map` at the kernel boundary, nowhere else.

XLA cannot partition a Pallas call, and DGA's selection is per (batch, KV head): both are
embarrassingly parallel over batch and heads. Under a mesh, `per_shard` hands each device its
batch x heads slice, so kernels and the XLA walk see local shapes. When the sequence is split
too (the `seq` mesh axis), a context-parallel strategy keeps it split:

- "ulysses": all-to-alls turn the sequence split into a head split around the unchanged
  attention (any implementation and selection), then back. Needs the KV heads of a tensor
  shard to be a multiple of the sequence parts.
- "dga": the sequence stays split through the attention (`ContextSplit`): DGA exchanges only
  sampled queries, softmax statistics, per-position scores, the compressed prefix and a halo
  of raw tokens; dense attention all-gathers K and V.
- "auto": "ulysses" where the heads allow it, else "dga".

Causal attention gives late positions more work: in zig-zag order (`zigzag=True`, the rows
permuted once by the data path) every device holds an early and a late piece of the sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dga_jax.ops.checks import check_lengths, check_qkv
from dga_jax.ops.context import WHOLE, ContextSplit, axis_tuple
from dga_jax.ops.dga.layout import DGALayout
from dga_jax.sharding import MeshAxes

STRATEGIES = ("auto", "ulysses", "dga")
CONTEXT_ORDERS = ("contiguous", "zigzag")

# attention(q, k, v, split=split, [lengths=, layout=]): q [B, C, Hq, D], k/v [B, C, Hkv, D] ->
# [B, C, Hq, D]; C = L/parts; lengths [B] (the valid positions of right-padded rows) and layout
# (DGA's, [B, Hkv, ...] leaves) only when per_shard has them.
SplitAttention = Callable[..., jax.Array]


def per_shard(
    attention: SplitAttention,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    batch: MeshAxes,
    heads: MeshAxes,
    seq: MeshAxes = None,
    strategy: str = "auto",
    zigzag: bool = False,
    lengths: jax.Array | None = None,
    layout: DGALayout | None = None,
) -> jax.Array:
    """`attention` on each device's slice: q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D].

    `batch`, `seq` and `heads` name the mesh axes that split B, L and the heads (query and KV
    heads alike, so each device keeps whole GQA groups); `strategy` (`STRATEGIES`) is how a
    split sequence is attended, and `zigzag` says its rows are in zig-zag order
    (`dga_jax.ops.context.zigzag_order`: row i holds position order[i]). The mesh is the one
    `jax.set_mesh` sets; without one it is a plain call. `lengths` [B], split like the batch, is
    passed on to `attention` (not under the "dga" strategy: it splits the sequence), and so is
    a whole-sequence DGA `layout`, split like the KV heads each device attends.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"context_parallel must be one of {STRATEGIES}, got {strategy!r}")
    check_qkv(q, k, v, None)  # here, where the errors can name the whole shapes
    lengths = check_lengths(lengths, q.shape[0], q.shape[1])
    named = _check_axes(batch=batch, seq=seq, heads=heads)
    extra = {name: x for name, x in (("lengths", lengths), ("layout", layout)) if x is not None}
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attention(q, k, v, split=WHOLE, **extra)
    lacking = {name: [a for a in names if a not in mesh.shape] for name, names in named.items()}
    lacking = {name: names for name, names in lacking.items() if names}
    if lacking:
        raise ValueError(
            f"per_shard's mesh axes {lacking} are not in the mesh (jax.set_mesh) {dict(mesh.shape)}"
        )
    for name, axes, size in (("batch", batch, q.shape[0]), ("KV heads", heads, k.shape[2])):
        shards = shard_count(axes)
        if size % shards:
            raise ValueError(
                f"attention shards {name} ({size}) over mesh axes {axes!r} of {shards} devices: "
                f"{name} must be a multiple of {shards}"
            )
    parts = shard_count(seq)
    attended_heads = heads  # the KV heads a device attends to
    if parts == 1:
        seq, body = None, functools.partial(attention, split=WHOLE)
    else:
        kv_heads = k.shape[2] // shard_count(heads)
        resolved = choose_strategy(strategy, kv_heads, q.shape[1], seq)
        split = ContextSplit(seq, parts, zigzag)
        split.order(q.shape[1])  # a length zig-zag order cannot cut fails here, naming it
        if resolved == "ulysses":
            body = functools.partial(_ulysses, attention, split)
            attended_heads = axis_names(heads) + axis_names(seq)  # the all-to-all's head split
        elif lengths is None:
            body = functools.partial(attention, split=split)
        else:
            raise _split_lengths_error(strategy, kv_heads, seq)
    spec = PartitionSpec(batch, seq, heads, None)
    split_as = {"lengths": PartitionSpec(batch), "layout": PartitionSpec(batch, attended_heads)}
    names = tuple(extra)

    def call(q, k, v, *operands):
        return body(q, k, v, **dict(zip(names, operands, strict=True)))

    specs = (spec,) * 3 + tuple(split_as[name] for name in names)
    # check_vma=False: the Pallas kernels' outputs do not say how they vary over the mesh.
    sharded = jax.shard_map(call, in_specs=specs, out_specs=spec, check_vma=False)

    def constrained(q, k, v, *operands):
        q, k, v = (jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v))
        return sharded(q, k, v, *operands)

    # jit: outside one, with_sharding_constraint refuses arrays on one device.
    return jax.jit(constrained)(q, k, v, *extra.values())


def choose_strategy(strategy: str, kv_heads: int, seq_len: int, seq: MeshAxes) -> str:
    """The strategy that runs for `strategy` ("auto" resolved), or an error naming the sizes.

    kv_heads: KV heads per tensor shard; seq_len: L; seq: the mesh axes splitting it.
    """
    parts = shard_count(seq)
    if seq_len % parts:
        raise ValueError(
            f"context parallelism splits the sequence ({seq_len} positions) over mesh axes "
            f"{seq!r} of {parts} devices: the length must be a multiple of {parts}"
        )
    if strategy == "auto":
        return "ulysses" if kv_heads % parts == 0 else "dga"
    if strategy == "ulysses" and kv_heads % parts:
        raise ValueError(
            f"context_parallel='ulysses' splits the {kv_heads} KV heads of each tensor shard "
            f"over mesh axes {seq!r} of {parts} devices: they must be a multiple of {parts}. "
            "Use context_parallel='dga' (or 'auto'), which splits the sequence instead"
        )
    return strategy


def _split_lengths_error(strategy: str, kv_heads: int, seq: MeshAxes) -> ValueError:
    """Per-row lengths under the "dga" strategy (given, or what `strategy` resolved to)."""
    parts = shard_count(seq)
    how = "'dga'" if strategy == "dga" else f"{strategy!r}, which resolved to 'dga',"
    fix = "a mesh without a sequence split"
    if kv_heads % parts == 0:  # the heads allow "ulysses"
        fix = f"context_parallel='ulysses' or {fix}"
    return ValueError(
        f"per-row lengths need whole sequences: context_parallel={how} splits them over mesh "
        f"axes {seq!r} of {parts} devices; use {fix}"
    )


def _ulysses(attention: SplitAttention, split: ContextSplit, q, k, v, **operands) -> jax.Array:
    """Sequence-split q, k, v [B, C, H, D] -> head-split [B, L, H/P, D] in position order,
    attention (with `lengths` and `layout`, if any: already split so), and back."""
    order = split.order(q.shape[1] * split.shards)
    natural = np.argsort(order)

    def to_heads(x):
        x = jax.lax.all_to_all(x, split.axis, split_axis=2, concat_axis=1, tiled=True)
        return x if split.pieces == 1 else jnp.take(x, natural, axis=1)

    out = attention(to_heads(q), to_heads(k), to_heads(v), split=WHOLE, **operands)
    out = out if split.pieces == 1 else jnp.take(out, order, axis=1)
    return jax.lax.all_to_all(out, split.axis, split_axis=1, concat_axis=2, tiled=True)


def shard_count(axes: MeshAxes) -> int:
    """How many parts `axes` of the current mesh (`jax.set_mesh`) split a dimension into."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    names = axis_names(axes)
    unknown = [name for name in names if name not in mesh.shape]
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not in the mesh {dict(mesh.shape)}")
    return math.prod(mesh.shape[name] for name in names)


def axis_names(axes: MeshAxes) -> tuple[str, ...]:
    """Mesh axes (None, a name or names) as a tuple of names."""
    return axis_tuple(axes, "mesh axes")


def _check_axes(**axes: MeshAxes) -> dict[str, tuple[str, ...]]:
    """Each argument's mesh axes as names; one mesh axis cannot split two dimensions."""
    names = {name: axis_tuple(given, f"per_shard's {name}") for name, given in axes.items()}
    seen: dict[str, str] = {}
    for name, mine in names.items():
        for axis in mine:
            if axis in seen:
                raise ValueError(
                    f"per_shard's {seen[axis]} and {name} both name mesh axis {axis!r}: one "
                    f"mesh axis splits one dimension (got {axes})"
                )
            seen[axis] = name
    return names
