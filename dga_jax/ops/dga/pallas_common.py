"""What the Pallas kernels share: padded operands, on-device block ranges, the custom VJP.

The kernels compute the same function as `dga_jax.ops.intervals.interval_attention`: a query
at position t sees entry e iff `start_e <= t < until_e`, with an additive bias. Entries come in
two lists per (batch, KV head), each padded to whole blocks of `block_k` with entries that are
never visible (start = NEVER):

- prefix (focal tokens and groups, sorted by `start`, visible for ever, bias log m for groups);
- band (raw tokens, sorted by `start`, non-decreasing `until`).

Query block i (positions `[i*bq, (i+1)*bq)`) visits prefix blocks `[0, full)` unmasked,
`[full, prefix_blocks)` masked, then band blocks `[band_first, band_first + band_blocks)`
masked (`QueryBlocks`). The key-stationary dK/dV kernels visit, for prefix block j, query blocks
`[q_first, q_full)` masked and `[q_full, nq)` unmasked, and for band block j query blocks
`[q_first, q_end)` masked (`KeyBlocks`). All ranges are computed on device from the entries.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dga_jax.ops.intervals import NEVER, Entries
from dga_jax.ops.ranges import block_ranges
from dga_jax.ops.tiles import round_up, varying_like


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static shape facts every kernel needs (hashable: a static argument)."""

    scale: float
    block_q: int
    block_k: int
    groups: int  # query heads per KV head
    seq_len: int  # L before padding
    interpret: object  # False, True (GPU interpreter) or pltpu.InterpretParams
    band_lag: int  # at most this many band entries starting before a query are visible to it
    launch: tuple[tuple[str, int], ...] = ()  # Triton's num_warps / num_stages if set

    def num_q_blocks(self, padded_len: int) -> int:
        return padded_len // self.block_q


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Operands:
    """Kernel operands, heads-major and padded to whole blocks."""

    q: jax.Array  # [B, Hq, Lp, D]
    prefix_k: jax.Array  # [B, Hkv, NP, D]
    prefix_v: jax.Array  # [B, Hkv, NP, D]
    prefix_start: jax.Array  # [B, Hkv, NP] int32
    prefix_bias: jax.Array  # [B, Hkv, NP] float32
    band_k: jax.Array  # [B, Hkv, NR, D]
    band_v: jax.Array  # [B, Hkv, NR, D]
    band_start: jax.Array  # [B, Hkv, NR] int32
    band_until: jax.Array  # [B, Hkv, NR] int32
    q_prefix: jax.Array | None = None  # [B, Hq, Lp, D]: the prefix's queries (None: q)

    @property
    def prefix_queries(self) -> jax.Array:
        """The queries that score the prefix entries."""
        return self.q if self.q_prefix is None else self.q_prefix


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QueryBlocks:
    """Per query block: the entry blocks it visits. All [B, Hkv, nq] int32."""

    full: jax.Array  # prefix blocks [0, full) are visible to every query of the block
    prefix_blocks: jax.Array  # prefix blocks [full, prefix_blocks) are visible to some
    band_first: jax.Array  # first band block visible to some query of the block
    band_blocks: jax.Array  # number of band blocks from band_first on


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyBlocks:
    """Per entry block: the query blocks that see it. [B, Hkv, NP/bk] and [B, Hkv, NR/bk]."""

    prefix_first: jax.Array  # first query block seeing some entry of the prefix block
    prefix_full: jax.Array  # query blocks [prefix_full, nq) see the whole prefix block
    band_first: jax.Array  # first query block seeing some entry of the band block
    band_end: jax.Array  # one past the last query block seeing some entry of the band block


def prepare(
    q: jax.Array,
    prefix: Entries,
    band: Entries | None,
    spec: KernelSpec,
    head_multiple: int = 1,
    q_prefix: jax.Array | None = None,
) -> Operands:
    """q (and q_prefix, or None) [B, L, Hq, D] and entry lists [B, Hkv, N, ...] -> padded
    `Operands`.

    `head_multiple`: D is zero-padded to a multiple of it (zeros change no dot product).
    """
    b, seq_len, _, d = q.shape
    hkv = prefix.k.shape[1]
    d_pad = round_up(d, head_multiple) - d
    lp = round_up(seq_len, spec.block_q)

    def heads_major(x):
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, lp - seq_len), (0, d_pad)))

    if band is None:
        empty = jnp.zeros((b, hkv, 0, d), prefix.k.dtype)
        start = jnp.zeros((b, hkv, 0), jnp.int32)
        band = Entries(empty, empty, start, start)
    n_prefix = max(round_up(prefix.k.shape[2], spec.block_k), spec.block_k)
    n_band = max(round_up(band.k.shape[2], spec.block_k), spec.block_k)
    bias = prefix.bias if prefix.bias is not None else jnp.zeros(prefix.start.shape, jnp.float32)
    until = band.until if band.until is not None else jnp.full(band.start.shape, NEVER, jnp.int32)
    operands = Operands(
        heads_major(q),
        _pad_entries(prefix.k, n_prefix, 0, d_pad),
        _pad_entries(prefix.v, n_prefix, 0, d_pad),
        _pad_entries(prefix.start, n_prefix, NEVER),
        _pad_entries(bias.astype(jnp.float32), n_prefix, 0),
        _pad_entries(band.k, n_band, 0, d_pad),
        _pad_entries(band.v, n_band, 0, d_pad),
        _pad_entries(band.start, n_band, NEVER),
        _pad_entries(until, n_band, NEVER),
        None if q_prefix is None else heads_major(q_prefix),
    )
    # One manual-axis type for all (inside `jax.shard_map`): the kernels' outputs take q's.
    return varying_like(operands, *jax.tree.leaves(operands))


def bound_lag(band: Entries, band_lag: int) -> Entries:
    """The band with each entry's `until` cut to one past the start of the entry `band_lag`
    places later: then at most band_lag entries that start before a query are visible to it.

    A band that keeps the bound already is unchanged (were until_e > start_{e+lag} + 1, the
    lag + 1 entries e..e+lag would all start before, and be visible at, start_{e+lag} + 1).
    DGA's band breaks it only at the padding queries of a right-padded row (padding tokens are
    visible from their position on, and nothing that matters sees them): cut, those queries
    still see something finite, and the kernels' static step counts hold.
    """
    until = band.until if band.until is not None else jnp.full(band.start.shape, NEVER, jnp.int32)
    later = band.start[..., band_lag:]
    cut = jnp.where(later < NEVER, later + 1, NEVER)
    cut = jnp.pad(
        cut, ((0, 0), (0, 0), (0, band.start.shape[2] - cut.shape[2])), constant_values=NEVER
    )
    return dataclasses.replace(band, until=jnp.minimum(until, cut))


def query_args(ops: Operands) -> tuple[jax.Array, ...]:
    """The queries a forward or dQ kernel reads: (q,), or (q, q_prefix)."""
    return (ops.q,) if ops.q_prefix is None else (ops.q, ops.q_prefix)


def _pad_entries(x: jax.Array, size: int, value, d_pad: int = 0) -> jax.Array:
    widths = [(0, 0), (0, 0), (0, size - x.shape[2])] + [(0, d_pad)] * (x.ndim - 3)
    return jnp.pad(x, widths, constant_values=value)


def query_blocks(ops: Operands, spec: KernelSpec) -> QueryBlocks:
    """The entry blocks each query block visits (searchsorted on device, no host round trip)."""
    bk, nq = spec.block_k, spec.num_q_blocks(ops.q.shape[2])
    ranges = block_ranges(ops.prefix_start, ops.band_start, ops.band_until, spec.block_q, nq)
    band_first = ranges.band_start // bk
    band_end = -(-ranges.band_end // bk)
    return QueryBlocks(
        full=ranges.prefix_full // bk,
        prefix_blocks=-(-ranges.prefix_end // bk),
        band_first=band_first,
        band_blocks=jnp.where(ranges.band_end > ranges.band_start, band_end - band_first, 0),
    )


def key_blocks(ops: Operands, spec: KernelSpec) -> KeyBlocks:
    """The query blocks that see each entry block (padding entries start at NEVER)."""
    bq, bk, lp = spec.block_q, spec.block_k, ops.q.shape[2]

    def blocks(x):  # [B, H, N] -> [B, H, N/bk, bk], positions clipped to the padded queries
        # (entries of a split sequence may start before this device's first query: start < 0)
        return jnp.clip(x, 0, lp).reshape(*x.shape[:2], -1, bk)

    prefix_start = blocks(ops.prefix_start)
    band_start = blocks(ops.band_start)
    valid = ops.band_start < NEVER
    band_until = blocks(jnp.where(valid, ops.band_until, 0))
    band_first = band_start[..., 0] // bq
    return KeyBlocks(
        prefix_first=prefix_start[..., 0] // bq,
        prefix_full=-(-prefix_start[..., -1] // bq),  # a block holding padding is never full
        band_first=band_first,
        band_end=jnp.maximum(-(-jnp.max(band_until, axis=-1) // bq), band_first),
    )


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One backend's three kernels, each a function of (spec, operands, blocks, ...)."""

    forward: Callable  # (spec, ops, qblocks) -> out [B, Hq, Lp, D], lse [B, Hq, Lp] f32
    dq: Callable  # (spec, ops, qblocks, do, lse, delta) -> dq, dq_prefix (or None) [B, Hq, Lp, D]
    dkv: Callable  # (spec, ops, kblocks, do, lse, delta) -> (dpk, dpv, dbk, dbv)


def kernel_attention(
    kernels: Kernels,
    q: jax.Array,
    prefix: Entries,
    band: Entries | None,
    *,
    scale: float,
    block_q: int,
    block_k: int,
    band_lag: int,
    interpret: object,
    head_multiple: int = 1,
    q_prefix: jax.Array | None = None,
    launch: dict[str, int] | None = None,
) -> jax.Array:
    """`interval_attention` computed by `kernels`: q [B, L, Hq, D] -> [B, L, Hq, D].

    `block_q`: the backend's (clamped) query block; `q_prefix` [B, L, Hq, D]: the queries the
    prefix entries are scored with (None: q), as in `interval_attention`; `launch`: the
    kernels' launch settings (`BlockSizes.launch`). Gradients reach q, q_prefix and the
    entries' k and v (then, through `compressed_kv`, the tokens).
    """
    b, seq_len, hq, d = q.shape
    spec = KernelSpec(
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        groups=hq // prefix.k.shape[1],
        seq_len=seq_len,
        interpret=interpret,
        band_lag=band_lag,
        launch=tuple(sorted((launch or {}).items())),
    )
    ops = prepare(q, prefix, band, spec, head_multiple, q_prefix)
    out = _attend(kernels, spec, ops)  # [B, Hq, Lp, Dp]
    return out[:, :, :seq_len, :d].transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(kernels: Kernels, spec: KernelSpec, ops: Operands) -> jax.Array:
    return kernels.forward(spec, ops, query_blocks(ops, spec))[0]


def _attend_fwd(kernels: Kernels, spec: KernelSpec, ops: Operands):
    blocks = query_blocks(ops, spec)
    out, lse = kernels.forward(spec, ops, blocks)
    return out, (ops, blocks, out, lse)


def _attend_bwd(kernels: Kernels, spec: KernelSpec, residuals, d_out):
    ops, blocks, out, lse = residuals
    # Padded query rows carry no cotangent, so they add nothing to dK and dV.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Hq, Lp]
    dq, dqp = kernels.dq(spec, ops, blocks, d_out, lse, delta)
    dpk, dpv, dbk, dbv = kernels.dkv(spec, ops, key_blocks(ops, spec), d_out, lse, delta)
    zeros = jax.tree.map(_zero_cotangent, ops)
    grads = dict(q=dq, q_prefix=dqp, prefix_k=dpk, prefix_v=dpv, band_k=dbk, band_v=dbv)
    return (dataclasses.replace(zeros, **grads),)


def _zero_cotangent(x: jax.Array):
    """Positions and biases are structure: integer leaves take float0 cotangents."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


_attend.defvjp(_attend_fwd, _attend_bwd)


def split_refs(refs, *sizes):
    """A kernel's flat refs -> consecutive groups of the given sizes."""
    out, offset = [], 0
    for size in sizes:
        out.append(refs[offset : offset + size])
        offset += size
    return out
