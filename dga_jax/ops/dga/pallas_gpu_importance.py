"""Global importance as two Triton kernels: `ImportancePasses` for implementation='pallas_gpu'.

XLA's passes (`selection.XLA_PASSES`) loop over tiles with trip counts read from the data; on a
GPU every trip is a few small launches (and, by XLA:GPU's while loop, a loop test read back on
the host), and importance took half of DGA's forward on an H200 (benchmarks/RESULTS.md, "## GPU").
Here each pass is one launch:

- stats: grid (B*Hkv, row tile); a program walks the key tiles its sampled rows see, `[0, full)`
  unmasked then `[full, end)` masked, with a float32 running max and sum (`mass_stats_step`);
- scores: grid (B*Hkv, key tile); a program walks the sampled row tiles that see its keys,
  masked where some row does not see some key, and sums their probabilities
  (`probability_mass`).

Rows are the sampled (query, head) pairs flattened as in `ImportancePasses` (s*G + g), taken
`ImportanceTile.rows` at a time, keys `ImportanceTile.keys` at a time; D is zero-padded to a
power of two. All loop bounds are computed on device from the positions. Row positions
increase, except that rows of a right-padded batch past its length are -1 (they see nothing)
and come last.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dga_jax.ops.dga.pallas_gpu import MIN_BLOCK, check_available, next_power_of_2
from dga_jax.ops.dga.pallas_gpu_forward import DOTS, compiler_params
from dga_jax.ops.dga.selection import ImportancePasses, ImportanceTiles
from dga_jax.ops.ranges import NEVER
from dga_jax.ops.tiles import mass_stats_step, probability_mass, round_up, varying_struct

# Binary searches unrolled: no XLA while loop (on a GPU, a launch or two per step) around the
# kernels.
SEARCH = "scan_unrolled"
_AFTER_ALL = NEVER - 1  # a row tile of padding only, placed after every key (and before NEVER)


@dataclasses.dataclass(frozen=True)
class ImportanceTile:
    """The kernels' tile: `rows` sampled (query, head) rows by `keys` keys, powers of two >= 16
    (Triton's dot)."""

    rows: int = 64
    keys: int = 64

    def __post_init__(self):
        for name in ("rows", "keys"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < MIN_BLOCK or value & (value - 1):
                raise ValueError(
                    f"ImportanceTile.{name} must be a power of two >= {MIN_BLOCK}, got {value!r}"
                )


def passes(interpret: bool, tile: ImportanceTile = ImportanceTile()) -> ImportancePasses:
    """The Triton passes (`interpret=True`: in Pallas' interpreter, on any backend); refused
    where this JAX has no Pallas Triton backend (`pallas_gpu.check_available`)."""
    check_available()
    return ImportancePasses(
        functools.partial(stats, tile=tile, interpret=interpret),
        functools.partial(scores, tile=tile, interpret=interpret),
    )


def stats(
    tiles: ImportanceTiles, *, tile: ImportanceTile, interpret: bool
) -> tuple[jax.Array, jax.Array]:
    """`ImportancePasses.stats`: (max, sum of exp) [B*Hkv, nS*G] float32."""
    q, pos, k, key_pos = _operands(tiles, tile)
    lo, hi = _row_tile_bounds(pos, tile)
    first_key, last_key = _key_tile_bounds(key_pos, tile)
    full = jnp.searchsorted(last_key, lo, side="right", method=SEARCH).astype(jnp.int32)
    end = jnp.searchsorted(first_key, hi, side="right", method=SEARCH).astype(jnp.int32)
    bh, rows, d = q.shape
    row_tiles = rows // tile.rows
    ranges = pl.BlockSpec((None, row_tiles), lambda b, i: (b, 0))
    row_block = pl.BlockSpec((None, tile.rows), lambda b, i: (b, i))
    out = varying_struct((bh, rows), jnp.float32, q, k)
    mx, total = pl.pallas_call(
        functools.partial(_stats_kernel, tile=tile, scale=tiles.scale),
        grid=(bh, row_tiles),
        in_specs=[
            ranges,
            ranges,
            pl.BlockSpec((None, tile.rows, d), lambda b, i: (b, i, 0)),
            row_block,
            pl.BlockSpec((None, *k.shape[1:]), lambda b, i: (b, 0, 0)),
            pl.BlockSpec(key_pos.shape, lambda b, i: (0,)),
        ],
        out_specs=[row_block, row_block],
        out_shape=[out, out],
        compiler_params=compiler_params(d),
        interpret=interpret,
        name="importance_stats",
    )(full, end, q, pos, k, key_pos)
    n = _sampled_rows(tiles)
    return mx[:, :n], total[:, :n]


def scores(
    tiles: ImportanceTiles, lse: jax.Array, *, tile: ImportanceTile, interpret: bool
) -> jax.Array:
    """`ImportancePasses.scores`: each key's probability mass [B*Hkv, C] float32."""
    q, pos, k, key_pos = _operands(tiles, tile)
    bh, rows, d = q.shape
    lse = jnp.pad(lse, ((0, 0), (0, rows - lse.shape[1])), constant_values=jnp.inf)
    bounds = _key_tile_ranges(pos, key_pos, tile)
    key_tiles = key_pos.shape[0] // tile.keys
    ranges = pl.BlockSpec((None, key_tiles), lambda b, j: (b, 0))
    whole_rows = pl.BlockSpec((None, rows), lambda b, j: (b, 0))
    key_block = pl.BlockSpec((None, tile.keys), lambda b, j: (b, j))
    out = pl.pallas_call(
        functools.partial(_scores_kernel, tile=tile, scale=tiles.scale),
        grid=(bh, key_tiles),
        in_specs=[
            *[ranges] * len(bounds),
            pl.BlockSpec((None, tile.keys, d), lambda b, j: (b, j, 0)),
            pl.BlockSpec((tile.keys,), lambda b, j: (j,)),
            pl.BlockSpec((None, rows, d), lambda b, j: (b, 0, 0)),
            whole_rows,
            whole_rows,
        ],
        out_specs=key_block,
        out_shape=varying_struct((bh, key_pos.shape[0]), jnp.float32, q, k),
        compiler_params=compiler_params(d),
        interpret=interpret,
        name="importance_scores",
    )(*bounds, k, key_pos, q, pos, lse)
    return out[:, : tiles.ks.shape[1]]


def _stats_kernel(
    full_ref, end_ref, q_ref, pos_ref, k_ref, key_pos_ref, mx_ref, total_ref, *, tile, scale
):
    i = pl.program_id(1)
    q, t = q_ref[...], pos_ref[...][:, None]

    def walk(masked):
        def step(j, state):
            keys = pl.ds(j * tile.keys, tile.keys)
            visible = key_pos_ref[keys][None, :] <= t if masked else None
            return mass_stats_step(scale, state, DOTS.nt(q, k_ref[keys, :]), visible)

        return step

    state = (jnp.full((tile.rows,), -jnp.inf, jnp.float32), jnp.zeros((tile.rows,), jnp.float32))
    full = full_ref[i]
    state = jax.lax.fori_loop(0, full, walk(False), state)
    mx_ref[...], total_ref[...] = jax.lax.fori_loop(full, end_ref[i], walk(True), state)


def _scores_kernel(*refs, tile, scale):
    (first_ref, whole_ref, after_ref, end_ref), refs = refs[:4], refs[4:]
    k_ref, key_pos_ref, q_ref, pos_ref, lse_ref, out_ref = refs
    j = pl.program_id(1)
    k, keys = k_ref[...], key_pos_ref[...][None, :]

    def walk(masked):
        def step(i, acc):
            rows = pl.ds(i * tile.rows, tile.rows)
            visible = keys <= pos_ref[rows][:, None] if masked else None
            raw = DOTS.nt(q_ref[rows, :], k)
            return acc + probability_mass(scale, raw, lse_ref[rows], visible)

        return step

    whole, after = whole_ref[j], after_ref[j]
    acc = jax.lax.fori_loop(first_ref[j], whole, walk(True), jnp.zeros((tile.keys,), jnp.float32))
    acc = jax.lax.fori_loop(whole, after, walk(False), acc)
    out_ref[...] = jax.lax.fori_loop(after, end_ref[j], walk(True), acc)


def _operands(tiles: ImportanceTiles, tile: ImportanceTile):
    """-> q [B*Hkv, R, D'], row positions [B*Hkv, R] (-1: none), k [B*Hkv, C', D'], key
    positions [C'] (NEVER: padding): rows and keys padded to whole tiles, D to a power of 2."""
    bh, n_sampled, g, d = tiles.qs.shape
    rows, n_keys = round_up(n_sampled * g, tile.rows), round_up(tiles.ks.shape[1], tile.keys)
    d_pad = next_power_of_2(d) - d
    q = jnp.pad(tiles.qs.reshape(bh, -1, d), ((0, 0), (0, rows - n_sampled * g), (0, d_pad)))
    pos = jnp.repeat(jnp.broadcast_to(tiles.row_pos, (bh, n_sampled)), g, axis=1)
    pos = jnp.pad(pos, ((0, 0), (0, rows - n_sampled * g)), constant_values=-1)
    k = jnp.pad(tiles.ks, ((0, 0), (0, n_keys - tiles.ks.shape[1]), (0, d_pad)))
    key_pos = jnp.pad(tiles.key_pos, (0, n_keys - tiles.key_pos.shape[0]), constant_values=NEVER)
    return q, pos, k, key_pos


def _sampled_rows(tiles: ImportanceTiles) -> int:
    return tiles.qs.shape[1] * tiles.qs.shape[2]


def _row_tile_bounds(pos: jax.Array, tile: ImportanceTile) -> tuple[jax.Array, jax.Array]:
    """Lowest and highest position of each row tile [B*Hkv, R / rows] (-1: a padding row)."""
    tiled = pos.reshape(pos.shape[0], -1, tile.rows)
    return jnp.min(tiled, axis=-1), jnp.max(tiled, axis=-1)


def _key_tile_bounds(key_pos: jax.Array, tile: ImportanceTile) -> tuple[jax.Array, jax.Array]:
    """First and last key position of each key tile [C' / keys] (NEVER: padding)."""
    tiled = key_pos.reshape(-1, tile.keys)
    return tiled[:, 0], tiled[:, -1]


def _key_tile_ranges(pos, key_pos, tile: ImportanceTile) -> tuple[jax.Array, ...]:
    """Per key tile, the row tiles the scores kernel walks [B*Hkv, C' / keys] each: masked
    `[first, whole)`, unmasked `[whole, after)` (every row sees every key), masked
    `[after, end)`.

    Row tiles before `first` see none of the keys and those from `end` on are padding only.
    Tiles holding a padding row (-1) come last and are never whole; so the whole tiles are
    a run ending where those begin, and ranked by their lowest position (increasing).
    """
    lo, hi = _row_tile_bounds(pos, tile)
    first_key, last_key = _key_tile_bounds(key_pos, tile)
    end = jnp.sum(hi >= 0, axis=1, keepdims=True)  # tiles with some real row
    real = jnp.sum(lo >= 0, axis=1, keepdims=True)  # tiles of real rows only

    def count_below(bounds, values):  # per batch row: #{bounds < value}, bounds increasing
        return jax.vmap(lambda b: jnp.searchsorted(b, values, side="left", method=SEARCH))(bounds)

    first = count_below(jnp.where(hi >= 0, hi, _AFTER_ALL), first_key)
    whole_from = count_below(jnp.where(lo >= 0, lo, _AFTER_ALL), last_key)
    whole = jnp.maximum(first, jnp.minimum(whole_from, real))
    after = jnp.maximum(whole, real)
    end = jnp.broadcast_to(end, first.shape)
    return tuple(x.astype(jnp.int32) for x in (first, whole, after, end))
