"""FLOP counts of one DGA call's walks, for `profile_attention.py`'s roofline.

The FLOPs the walks do (4 * rows * entries * D per tile: each query block's prefix rounded up to
whole block_k blocks, trip counts shared by all heads, and the band windows' padding), the FLOPs
of the spec's arithmetic bound (each query times the entries it exactly sees), the selection's
matmul FLOPs, and the bounds on dense / DGA that follow.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
from dga_stages import Setup

from dga_jax.ops.band import band_rows, window_chunk, window_width
from dga_jax.ops.dga.selection import sampled_positions
from dga_jax.ops.intervals import Entries, query_block_size
from dga_jax.ops.ranges import block_ranges
from dga_jax.ops.tiles import round_up


@dataclasses.dataclass(frozen=True)
class Intervals:
    """The visibility of the entries the call reads, on the host: prefix starts, band starts and
    band untils, each [B, H, N] (an empty band: N = 0)."""

    prefix_start: np.ndarray
    band_start: np.ndarray
    band_until: np.ndarray

    @classmethod
    def of(cls, prefix: Entries, band: Entries | None) -> Intervals:
        """From the (prefix, band) of `compressed_kv`."""
        empty = np.zeros((*prefix.start.shape[:2], 0), np.int32)
        if band is None:
            return cls(np.asarray(prefix.start), empty, empty)
        return cls(*(np.asarray(x) for x in (prefix.start, band.start, band.until)))

    def __iter__(self):
        return iter((self.prefix_start, self.band_start, self.band_until))


def walk_tile(s: Setup, entries: Intervals, args: argparse.Namespace) -> dict[str, int]:
    """The walk's tiling, as `interval_attention` clamps it to the problem size."""
    groups = args.heads // args.kv_heads
    n_prefix, n_band = entries.prefix_start.shape[-1], entries.band_start.shape[-1]
    lag, period = s.bounds
    period = period if n_band else 0
    block_q = query_block_size(s.blocks.block_q, s.seq_len, period)
    block_k = min(s.blocks.block_k, round_up(max(n_prefix, 1), 8))
    if period:  # a chunk's queries read its entries
        band_q = width = period
    else:
        band_q = band_rows(block_q, s.blocks.block_band, lag)
        _, width = window_chunk(window_width(band_q, lag, n_band), s.blocks.block_k)
    return {
        "block_q": block_q,
        "block_k": block_k,
        "block_edge": math.gcd(block_k, s.blocks.block_edge),
        "band_q": band_q,
        "band_width": width,
        "rows": block_q * groups,
        "query_blocks": -(-s.seq_len // block_q),
    }


def walk_flops(entries: Intervals, tile: dict[str, int], args: argparse.Namespace) -> dict:
    """FLOPs the walks do: every visited tile, 2 matmuls of 2 * rows * entries * D."""
    ranges = block_ranges(*entries, tile["block_q"], tile["query_blocks"])
    prefix_full = np.asarray(ranges.prefix_full).reshape(-1, tile["query_blocks"])
    prefix_end = np.asarray(ranges.prefix_end).reshape(-1, tile["query_blocks"])
    # Trip counts shared by all heads: whole blocks, then edge blocks (as interval_attention).
    whole = prefix_full.min(axis=0) // tile["block_k"] * tile["block_k"]
    edge = -(-(prefix_end.max(axis=0) - whole) // tile["block_edge"]) * tile["block_edge"]
    per_entry = 4 * args.head_dim * args.batch * args.heads * tile["block_q"]
    prefix = per_entry * int((whole + edge).sum())
    band = per_entry * tile["query_blocks"] * tile["band_width"] if entries.band_start.size else 0
    return {"prefix": prefix, "band": band}


def exact_flops(entries: Intervals, seq_len: int, args: argparse.Namespace) -> dict:
    """The spec's arithmetic bound: 4 * D FLOPs per (query head, position, visible entry)."""
    t = np.arange(seq_len)
    heads = zip(*(x.reshape(-1, x.shape[-1]) for x in entries), strict=True)
    prefix = band = 0
    for prefix_start, band_start, band_until in heads:
        prefix += int(np.searchsorted(prefix_start, t, side="right").sum())
        seen = np.searchsorted(band_start, t, "right") - np.searchsorted(band_until, t, "right")
        band += int(seen.sum())
    per_entry = 4 * args.head_dim * (args.heads // args.kv_heads)
    return {"prefix": per_entry * prefix, "band": per_entry * band}


def importance_flops(s: Setup, args: argparse.Namespace) -> int:
    """The selection's matmul FLOPs: global scores each sampled query against every key up to
    it twice (its softmax normaliser, then the probabilities); streaming scores each key with
    its chunk's last query once."""
    per_pair = 2 * args.head_dim * args.batch * args.heads
    if s.config.selection == "streaming":
        return per_pair * s.seq_len
    sampled = sampled_positions(s.seq_len, s.config.group_size)
    return 2 * per_pair * int((sampled + 1).sum())


def bounds(dense: float, walk: float, importance: float) -> dict[str, float]:
    """dense / DGA FLOPs, forward and forward+backward: the backward recomputes the logits and
    adds dV, dP, dQ and dK (3.5x the forward's two matmuls per visible pair); selection has no
    backward."""
    return {
        "forward": dense / (walk + importance),
        "fwd+bwd": 3.5 * dense / (3.5 * walk + importance),
    }
