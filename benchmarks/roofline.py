"""`profile_attention.py`'s roofline: the matmul peak of the walk's tile, the FLOPs the walks
do and those they must (`walk_flops.py`), their achieved rates, the dense reference's, and the
arithmetic bounds on dense / DGA with the share of them a run reached."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from dga_stages import Setup
from walk_flops import Intervals, bounds, exact_flops, importance_flops, walk_flops, walk_tile

from dga_jax.timing import time_calls

GFLOP = 1e9


def peak_shape(args: argparse.Namespace, tile: dict[str, int]) -> tuple[int, int]:
    """(R, N) of the peak's matmul: the XLA walk's tile; for the kernels, whose tile is no XLA
    matmul, 4096 x 4096."""
    return (tile["rows"], tile["block_k"]) if args.implementation == "xla" else (4096, 4096)


def matmul_peak(args: argparse.Namespace, tile: dict[str, int], repeats: int) -> float:
    """FLOP/s of a jitted [BH, R, D] x [BH, N, D]^T matmul (`peak_shape`; best call)."""
    bh, d = args.batch * args.kv_heads, args.head_dim
    rows, cols = peak_shape(args, tile)
    keys = jax.random.split(jax.random.key(1), 2)
    a = jax.random.normal(keys[0], (bh, rows, d), args.dtype)
    b = jax.random.normal(keys[1], (bh, cols, d), args.dtype)

    def matmul(a, b):
        return jnp.einsum("brd,bnd->brn", a, b, preferred_element_type=jnp.float32)

    best = min(time_calls(jax.jit(matmul), [a, b], max(repeats, 10)))
    return 2 * bh * rows * cols * d / (best / 1e3)


def roofline(s: Setup, entries: Intervals, t: dict, args: argparse.Namespace) -> dict:
    """Peak, walk and exact FLOPs, the walks' achieved FLOP/s, and the arithmetic bounds."""
    tile = walk_tile(s, entries, args)
    exact = exact_flops(entries, s.seq_len, args)
    done = walk_flops(entries, tile, args) if s.implementation == "xla" else dict(exact)
    done["walk"], exact["walk"] = done["prefix"] + done["band"], exact["prefix"] + exact["band"]
    ms = {"prefix": t["prefix walk"], "band": t["band walk"], "walk": t["walk"]}
    causal = args.batch * args.heads * s.seq_len * (s.seq_len + 1) // 2
    dense, importance = 4 * args.head_dim * causal, importance_flops(s, args)
    bound = bounds(dense, exact["walk"], importance)
    return {
        "tile": tile,
        "matmul_peak_flops": matmul_peak(args, tile, args.repeats),
        "walk_flops": done,
        "exact_flops": exact,
        "importance_flops": importance,
        "achieved_flops": {name: done[name] / (ms[name] / 1e3) for name in ms},
        "dense_causal_flops": dense,
        "dense_achieved_flops": {
            mode: factor * dense / (t[f"dense {mode}"] / 1e3)
            for mode, factor in (("forward", 1.0), ("fwd+bwd", 3.5))
        },
        "walk_flops_counted": s.implementation == "xla",
        "bound": bound,
        "share_of_bound": {
            "forward": t["dense forward"] / t["forward"] / bound["forward"],
            "fwd+bwd": t["dense fwd+bwd"] / t["fwd+bwd"] / bound["fwd+bwd"],
        },
    }


def print_roofline(roof: dict, args: argparse.Namespace) -> None:
    """Peak, FLOPs done vs needed, achieved FLOP/s per walk."""
    tile, peak = roof["tile"], roof["matmul_peak_flops"]
    bh = args.batch * args.kv_heads
    rows, cols = peak_shape(args, tile)
    shape = f"[{bh}, {rows}, {args.head_dim}] x [{bh}, {cols}, {args.head_dim}]^T"
    print(f"\nmatmul peak ({shape}, {args.dtype}): {peak / GFLOP:.1f} GFLOP/s")
    if not roof["walk_flops_counted"]:
        print("(the kernels' own FLOPs are not counted: GFLOP/s below are exact FLOPs / time)")
    print(f"{'walk':<8}{'GFLOP done':>12}{'GFLOP exact':>13}{'done/exact':>12}", end="")
    print(f"{'GFLOP/s':>10}{'% peak':>8}")
    for name in ("prefix", "band", "walk"):
        done, exact = roof["walk_flops"][name], roof["exact_flops"][name]
        achieved = roof["achieved_flops"][name]
        ratio = f"{done / exact:.2f}" if exact else "—"
        print(
            f"{name:<8}{done / GFLOP:>12.2f}{exact / GFLOP:>13.2f}{ratio:>12}"
            f"{achieved / GFLOP:>10.1f}{100 * achieved / peak:>8.1f}"
        )
    dense, importance = roof["dense_causal_flops"], roof["importance_flops"]
    rates = roof["dense_achieved_flops"]
    print(
        f"dense {args.dense}: {rates['forward'] / GFLOP:.1f} GFLOP/s forward, "
        f"{rates['fwd+bwd'] / GFLOP:.1f} forward+backward (exact FLOPs / time)"
    )
    print(
        f"dense causal (exact): {dense / GFLOP:.2f} GFLOP = "
        f"{dense / roof['exact_flops']['walk']:.2f}x the walks' exact FLOPs; "
        f"selection: {importance / GFLOP:.2f} GFLOP"
    )
    for mode in ("forward", "fwd+bwd"):
        bound, share = roof["bound"][mode], roof["share_of_bound"][mode]
        print(f"arithmetic bound, {mode}: {bound:.2f}x; measured {100 * share:.0f}% of it")
