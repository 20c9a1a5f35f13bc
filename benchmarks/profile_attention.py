"""Where one DGA attention call spends its time: each stage timed on its own, side by side.

    python benchmarks/profile_attention.py                              # L=16K: minutes on CPU
    python benchmarks/profile_attention.py --quick                      # L=2K, 2 repeats
    python benchmarks/profile_attention.py --lengths 4096,8192 --repeats 3
    python benchmarks/profile_attention.py --implementation pallas_gpu --dense cudnn \\
        --dtype bfloat16 --heads 32 --kv-heads 32                       # the Triton kernels

`dga_jax.dga_attention(..., implementation=...)` ("xla" by default) is cut at its stage
boundaries (`dga_stages.py`); each stage is jitted on its own and timed on the previous stage's
outputs (computed once, so every stage sees the same inputs as inside the whole call):

- importance: `global_importance`, two flash-style passes over the sampled queries' triangle;
- selection: `top_r_mask`, the radix select of the r focal tokens;
- layout: the two sorted entry lists (`layout._assemble` per batch and head, as `dga_layout`);
- gather: the compressed KV' (`compressed_kv`: raw tokens, folded groups, focal tokens);
- prefix walk / band walk: the implementation's interval attention over the prefix only, and
  over the band only (an empty prefix); under "pallas_gpu" importance and the walks are the
  Triton kernels (`--blocks RxK[wW][sS]`: their tiles and launch, default the backend's);
- backward, prefix walk / band walk: `jax.grad` of each walk (in q and the entries' k, v) less
  its forward;
- backward, rest: the whole call's forward+backward less its forward and the walks' backwards
  (the gather's transpose: scatter-adds into dK and dV).

"other" is the whole forward less the forward stages: glue the stages do not cover, negative
when the stages timed apart cost more than the fused call. "% fwd" is a share of the whole
forward call, "% fwd+bwd" of the whole forward+backward call; the dense reference (`--dense`:
by default `dga_jax.dense_attention(implementation="blockwise")`, the same walk over all L
tokens, in its own default tiles `DENSE_BLOCKS`; "cudnn" on a GPU) gives the ratio dense / DGA.
Each function is compiled and warmed up once, then all are timed in `--repeats` rounds of one
call each (the median), so changes in load hit every stage alike.

Roofline: this machine's matmul peak, measured on the walk's tile ([B*Hkv, block_q*G, D] times
[B*Hkv, block_k, D]^T, best of `max(repeats, 10)` calls); the FLOPs the walks do, those of the
spec's arithmetic bound and of the selection (global: two QK passes over the sampled queries;
streaming: one score per key), all counted in `walk_flops.py`; the walks' achieved FLOP/s; the
dense reference's (exact FLOPs / time); the bounds on dense / DGA that follow, forward and
forward+backward, and how much of each bound this run's ratio reached. The kernels' own FLOPs
are not counted: their rates are exact FLOPs / time, and the peak is that of a [B*Hkv, 4096, D]
x [B*Hkv, 4096, D]^T matmul. `--selection streaming` profiles the causal rule, whose importance
stage is the per-chunk scoring and whose focal tokens are spread evenly.
Defaults: B=1, Hq=Hkv=8, D=128, m=16, gamma=0.1, global selection, float32, "xla",
`BlockSizes()`. Results: the tables on stdout and
`benchmarks/results/profile_attention[_<kernels>]_<backend>[_quick].json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics

import jax
from block_args import parse_blocks
from common import (
    Calls,
    add_attention_args,
    check_attention_args,
    environment,
    length_label,
    positive_int,
    positive_ints,
    write_results,
)
from dga_stages import (
    Setup,
    band_walk,
    build_layout,
    dense_forward,
    dga_forward,
    gather,
    importance,
    selection,
    walk,
    walk_grad,
    with_grad,
)
from roofline import print_roofline, roofline
from walk_flops import Intervals

from dga_jax import BlockSizes, DGAConfig
from dga_jax.ops.dga import backends
from dga_jax.ops.intervals import Entries

FORWARD_STAGES = ("importance", "selection", "layout", "gather", "prefix walk", "band walk")
BACKWARD_STAGES = ("backward: prefix walk", "backward: band walk", "backward: rest")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; --quick means L=2K and 2 repeats."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="L=2K, 2 repeats")
    p.add_argument("--lengths", type=positive_ints, help="comma list (default 16384)")
    p.add_argument(
        "--repeats", type=positive_int, help="timed calls per stage (default 3; quick 2)"
    )
    add_attention_args(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--implementation", choices=backends.INTERVAL_IMPLEMENTATIONS, default="xla")
    p.add_argument("--interpret", action="store_true", help="the kernels in Pallas' interpreter")
    p.add_argument("--blocks", help="RxK[wW][sS]: the tiles (and Triton launch) of DGA's call")
    p.add_argument("--dense", choices=("blockwise", "cudnn", "xla"), default="blockwise")
    args = p.parse_args(argv)
    check_attention_args(p, args)
    check_kernel_args(p, args)
    args.lengths = args.lengths or ([2048] if args.quick else [16384])
    args.repeats = args.repeats or (2 if args.quick else 3)
    config = DGAConfig(args.group_size, args.focal_ratio, args.selection)
    bandless = [n for n in args.lengths if not config.sizes(n).num_raw]
    if bandless:  # the band walk is a stage of its own: a call without one cannot be cut so
        p.error(f"--lengths {bandless}: too short for a band walk (no raw entries) to profile")
    return args


def check_kernel_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--blocks must parse into BlockSizes (`profile` parses it again); --interpret only with
    a kernel."""
    if args.interpret and args.implementation == "xla":
        p.error("--interpret runs the Pallas kernels: pass --implementation pallas_gpu/pallas_tpu")
    try:
        blocks = None if args.blocks is None else parse_blocks(args.blocks)
    except ValueError as error:
        p.error(f"--blocks {args.blocks}: {error}")
    if args.blocks is not None and blocks is None:
        p.error(f"--blocks {args.blocks!r} is not RxK[wW][sS] (e.g. 128x64, 128x64w4s3)")
    if blocks is not None and blocks.launch and args.implementation != "pallas_gpu":
        p.error(f"--blocks {args.blocks}: Triton's warps and stages apply to pallas_gpu only")


def make_inputs(args: argparse.Namespace, length: int) -> dict[str, jax.Array]:
    """q, ct [B, L, Hq, D] and k, v [B, L, Hkv, D], standard normal from a fixed seed."""
    q_shape = (args.batch, length, args.heads, args.head_dim)
    kv_shape = (args.batch, length, args.kv_heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = {"q": q_shape, "k": kv_shape, "v": kv_shape, "ct": q_shape}
    return {
        name: jax.random.normal(key, shape, args.dtype)
        for key, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


def stage_calls(s: Setup, x: dict[str, jax.Array]) -> tuple[Calls, tuple[Entries, Entries | None]]:
    """Every stage and whole call on the previous stages' outputs, and the entries read."""
    c, p = Calls(), functools.partial
    score = c.add("importance", p(importance, s), x["q"], x["k"])
    focal = c.add("selection", p(selection, s), score)
    layout = c.add("layout", p(build_layout, s), focal, score)
    prefix, band = c.add("gather", p(gather, s), layout, x["q"], x["k"], x["v"])
    c.add("prefix walk", p(walk, s), x["q"], prefix, None)
    c.add("band walk", p(band_walk, s), x["q"], band)
    c.add("walk", p(walk, s), x["q"], prefix, band)
    c.add("prefix walk fwd+bwd", p(walk_grad, s), x["q"], prefix, None, x["ct"])
    c.add("band walk fwd+bwd", p(walk_grad, s), x["q"], None, band, x["ct"])
    qkv = [x["q"], x["k"], x["v"]]
    c.add("forward", p(dga_forward, s), *qkv)
    c.add("fwd+bwd", p(with_grad(dga_forward), s), *qkv, x["ct"])
    c.add("dense forward", p(dense_forward, s), *qkv)
    c.add("dense fwd+bwd", p(with_grad(dense_forward), s), *qkv, x["ct"])
    return c, (prefix, band)


def stage_ms(t: dict[str, float]) -> dict[str, float]:
    """Each stage's ms from the calls' ms `t`; "other" and the backwards are differences."""
    ms = {name: t[name] for name in FORWARD_STAGES}
    ms["other"] = t["forward"] - sum(ms.values())
    for walked in ("prefix walk", "band walk"):
        ms[f"backward: {walked}"] = t[f"{walked} fwd+bwd"] - t[walked]
    walks = ms["backward: prefix walk"] + ms["backward: band walk"]
    ms["backward: rest"] = t["fwd+bwd"] - t["forward"] - walks
    return ms


def stage_rows(median: dict[str, float], best: dict[str, float]) -> list[dict]:
    """Table rows: each stage's median and min ms, and its median's shares of the forward and
    forward+backward calls' medians."""
    low = stage_ms(best)
    rows = []
    for name, value in stage_ms(median).items():
        forward = name not in BACKWARD_STAGES
        rows.append(
            {
                "stage": name,
                "median_ms": value,
                "min_ms": low[name],
                "share_fwd": value / median["forward"] if forward else None,
                "share_fwd_bwd": value / median["fwd+bwd"],
                "measured": name in FORWARD_STAGES,
            }
        )
    return rows


# Output.


def print_stages(record: dict, args: argparse.Namespace) -> None:
    """The stage table, the whole calls and the dense reference."""
    t, best = record["median_ms"], record["min_ms"]
    print(f"\n{'stage':<24}{'median ms':>11}{'min ms':>9}{'% fwd':>8}{'% fwd+bwd':>11}")
    for row in record["stages"]:
        fwd = "" if row["share_fwd"] is None else f"{100 * row['share_fwd']:.1f}"
        note = "" if row["measured"] else "  (a difference)"
        cells = f"{row['stage']:<24}{row['median_ms']:>11.1f}{row['min_ms']:>9.1f}{fwd:>8}"
        print(f"{cells}{100 * row['share_fwd_bwd']:>11.1f}{note}")
    print(f"{'DGA forward':<24}{t['forward']:>11.1f}{best['forward']:>9.1f}{100:>8.1f}")
    name = "DGA forward+backward"
    print(f"{name:<24}{t['fwd+bwd']:>11.1f}{best['fwd+bwd']:>9.1f}{'':>8}{100:>11.1f}")
    walks = t["prefix walk"] + t["band walk"]
    print(f"(prefix and band walk in one call: {t['walk']:.1f} ms; apart: {walks:.1f} ms)")
    for mode in ("forward", "fwd+bwd"):
        dense = t[f"dense {mode}"]
        print(f"dense {args.dense} {mode}: {dense:.1f} ms = {dense / t[mode]:.2f}x DGA's")


def profile(args: argparse.Namespace, length: int) -> dict:
    """Times every stage at `length`, with the roofline numbers."""
    inputs = make_inputs(args, length)
    given = None if args.blocks is None else parse_blocks(args.blocks)  # checked by parse_args
    blocks = given or BlockSizes()
    if args.implementation != "xla":  # the kernel's default tiles, and its checks
        qkv = (inputs["q"], inputs["k"], inputs["v"])
        blocks = backends.check_kernel(args.implementation, given, args.interpret, *qkv)
    s = Setup(
        DGAConfig(args.group_size, args.focal_ratio, args.selection),
        1.0 / math.sqrt(args.head_dim),
        blocks,
        length,
        args.batch,
        args.implementation,
        args.interpret,
        args.dense,
    )
    calls, (prefix, band) = stage_calls(s, inputs)
    entries = Intervals.of(prefix, band)
    times = calls.time_ms(args.repeats)
    median = {name: statistics.median(ms) for name, ms in times.items()}
    best = {name: min(ms) for name, ms in times.items()}
    return {
        "L": length,
        "blocks": dataclasses.asdict(blocks),
        "times_ms": times,
        "median_ms": median,
        "min_ms": best,
        "stages": stage_rows(median, best),
        "roofline": roofline(s, entries, median, args),
    }


def main(argv: list[str] | None = None) -> None:
    """Profile every length, print the tables and write the JSON."""
    args = parse_args(argv)
    env = environment()
    shape = f"B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}"
    dga = f"m={args.group_size}, gamma={args.focal_ratio:g}, {args.selection} selection"
    device = f"{env['device_kind']} ({env['backend']})"
    print(f"DGA {args.implementation} stages on {device}, {args.dtype}, {shape}, {dga}")
    records = []
    for length in args.lengths:
        record = profile(args, length)
        print(f"\nL={length_label(length)}, median of {args.repeats}")
        print_stages(record, args)
        print_roofline(record["roofline"], args)
        records.append(record)
    name = "profile_attention" + ("" if args.implementation == "xla" else f"_{args.implementation}")
    print(f"\nwrote {write_results(name, args, env, records)}")


if __name__ == "__main__":
    main()
