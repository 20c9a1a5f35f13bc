"""Global importance (DGA's selection pass) by XLA's loops against the Triton kernels, side by side.

    python benchmarks/importance.py                                  # on a GPU: L = 4K..32K
    python benchmarks/importance.py --tiles 64x64,128x64,128x128     # the kernels' tile sweep
    python benchmarks/importance.py --quick --interpret              # any backend: a logic check

`dga_jax.ops.dga.selection.global_importance` (the spec's s_i: the sampled queries' softmax
probabilities summed per key, two passes) with `XLA_PASSES` ("xla") and with the Triton kernels
(`pallas_gpu_importance`, "triton RxK": R sampled rows by K keys a tile). Each variant is
compiled and warmed up, then all are timed in `--repeats` rounds of one call each (medians).
Every kernel variant's scores are checked against XLA's (largest difference relative to the
largest score). TFLOP/s counts both passes' QK products over the visible (sampled query, key)
pairs. The kernels run compiled on a GPU only; `--interpret` runs them in Pallas' interpreter
anywhere (slow: small lengths). Defaults: bfloat16, B=1, Hq=Hkv=32, D=128, m=16 (LLaMA2-7B's
attention). Results: the table on stdout and
`benchmarks/results/importance_<backend>[_quick].json`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    Calls,
    check_heads,
    environment,
    failed_record,
    length_label,
    out_dir,
    positive_int,
    positive_ints,
    write_results,
)

from dga_jax.ops.dga import pallas_gpu_importance
from dga_jax.ops.dga.selection import global_importance, sampled_positions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="L in {1K, 2K}, 2 repeats")
    p.add_argument("--lengths", type=positive_ints, help="comma list (default 4096,...,32768)")
    p.add_argument(
        "--tiles", type=tiles, default="64x64", help="the kernels' tiles, rows x keys, comma list"
    )
    p.add_argument("--repeats", type=positive_int, help="timed rounds (default 5; --quick: 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--interpret", action="store_true", help="kernels in Pallas' interpreter")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=32, help="query heads Hq")
    p.add_argument("--kv-heads", type=positive_int, default=32, help="key/value heads Hkv")
    p.add_argument("--head-dim", type=positive_int, default=128)
    p.add_argument("--group-size", type=positive_int, default=16, help="DGA group size m")
    p.add_argument("--out", type=out_dir, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    check_heads(p, args)
    if not args.interpret and jax.default_backend() != "gpu":
        p.error(f"the Triton kernels run on a GPU, not {jax.default_backend()!r}: add --interpret")
    args.lengths = args.lengths or ([1024, 2048] if args.quick else [4096, 8192, 16384, 32768])
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


def tiles(text: str) -> list[tuple[int, int]]:
    """argparse type: a comma list of "RxK" tiles `ImportanceTile` accepts, e.g. "64x64,128x64"."""
    out = []
    for item in text.split(","):
        rows, x, keys = item.strip().partition("x")
        if not (x and rows.isdigit() and keys.isdigit()):
            raise argparse.ArgumentTypeError(f"not rows x keys (e.g. 64x64): {item!r}")
        try:
            pallas_gpu_importance.ImportanceTile(int(rows), int(keys))
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{item!r}: {error}") from None
        out.append((int(rows), int(keys)))
    return out


def variants(args) -> dict[str, functools.partial]:
    """name -> global_importance with those passes."""
    out = {"xla": functools.partial(global_importance, passes=None)}
    for rows, keys in args.tiles:
        tile = pallas_gpu_importance.ImportanceTile(rows, keys)
        passes = pallas_gpu_importance.passes(args.interpret, tile)
        out[f"triton {rows}x{keys}"] = functools.partial(global_importance, passes=passes)
    return out


def pass_flops(length: int, args) -> float:
    """Both passes' QK products over the visible (sampled query, key) pairs, all heads."""
    pairs = float(np.sum(sampled_positions(length, args.group_size) + 1))
    return 2 * 2 * pairs * args.head_dim * args.heads * args.batch


def measure(length: int, args) -> list[dict]:
    """Every variant at `length`, timed in turns; one that fails to compile or run (a tile the
    GPU has no room for) is recorded as failed and the others still run."""
    keys = jax.random.split(jax.random.key(length), 2)
    dtype = jnp.dtype(args.dtype)
    q = jax.random.normal(keys[0], (args.batch, length, args.heads, args.head_dim), dtype)
    k = jax.random.normal(keys[1], (args.batch, length, args.kv_heads, args.head_dim), dtype)
    scale = args.head_dim**-0.5
    calls, scores, records = Calls(), {}, {}
    for name, fn in variants(args).items():
        try:
            scores[name] = calls.add(
                name, functools.partial(fn, group_size=args.group_size, scale=scale), q, k
            )
        except Exception as err:
            records[name] = dict(L=length, variant=name, **failed_record(err))
    flops = pass_flops(length, args)
    for name, ms in calls.time_ms(args.repeats).items():
        median = statistics.median(ms)
        records[name] = dict(
            L=length,
            variant=name,
            status="ok",
            median_ms=median,
            times_ms=ms,
            tflops=flops / median / 1e9,
            relative_error=relative_error(scores[name], scores.get("xla")),
        )
    return [records[name] for name in variants(args)]


def relative_error(scores: jax.Array, want: jax.Array | None) -> float | None:
    """The largest difference from XLA's scores over the largest of them (None: XLA failed)."""
    if want is None:
        return None
    want = np.asarray(want)
    return float(np.max(np.abs(np.asarray(scores) - want)) / np.max(np.abs(want)))


def report(records: list[dict]) -> None:
    print(
        f"{'L':>6}  {'variant':<16}{'median ms':>11}{'TFLOP/s':>9}{'xla / this':>12}"
        f"{'rel. err':>10}"
    )
    xla = {r["L"]: r["median_ms"] for r in records if r["variant"] == "xla"}
    for r in records:
        if r["median_ms"] is None:
            print(f"{length_label(r['L']):>6}  {r['variant']:<16}  {r['status']}")
            continue
        base = xla.get(r["L"])
        ratio = "—" if base is None else f"{base / r['median_ms']:.2f}x"
        error = "—" if r["relative_error"] is None else f"{r['relative_error']:.1e}"
        print(
            f"{length_label(r['L']):>6}  {r['variant']:<16}{r['median_ms']:>11.2f}"
            f"{r['tflops']:>9.1f}{ratio:>12}{error:>10}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment()
    print(
        f"global importance on {env['device_kind']} ({env['backend']}), {args.dtype}, "
        f"B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
        f"m={args.group_size}, median of {args.repeats}"
    )
    records = [r for length in args.lengths for r in measure(length, args)]
    report(records)
    print(f"wrote {write_results('importance', args, env, records)}")


if __name__ == "__main__":
    main()
