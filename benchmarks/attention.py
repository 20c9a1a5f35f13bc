"""Benchmark Dynamic Group Attention against dense causal attention, forward and forward+backward.

Compares `dga_jax.dga_attention` with implementation "pallas_gpu" / "pallas_tpu" (the kernels, on
their own hardware only: interpret mode says nothing about speed) and "xla" ("dga_xla") with
`dga_jax.dense_attention` "xla" (`jax.nn.dot_product_attention`, materialises L x L logits),
"blockwise" (flash-style XLA, memory linear in L) and, on GPU only, "cudnn". The speedup column
is each row's time over the first DGA implementation's (the kernel where there is one). A DGA
implementation may name its tiles: `dga_pallas_gpu@128x64` runs `BlockSizes(block_q=128,
block_k=64)` (the rest default), `dga_pallas_gpu@128x64w4s3` also Triton's launch (4 warps, 3
stages; `block_args.py`), for a sweep side by side. `--window W` gives the dense
implementations a sliding window of W keys (Mistral's `sliding_window`): DGA against a
windowed dense model.
Defaults: L in {2K, ..., 32K}, B=1, Hq=Hkv=8, D=128, gamma=0.1, m=16, float32 on CPU and
bfloat16 on an accelerator. The issue's GPU table: `--heads 32 --kv-heads 32 --lengths
4096,8192,16384,32768 --impls dga_pallas_gpu,dga_xla,dense_cudnn` (bfloat16 by default).

    python benchmarks/attention.py --quick   # L in {1K, 2K}, 2 repeats: under a minute on CPU
    python benchmarks/attention.py           # the full sweep (`make bench`): long on CPU
    python benchmarks/attention.py --help    # shapes, lengths, implementations, limits

Each configuration is compiled, warmed up once and timed `--repeats` times; the table gives the
median and min ms, DGA's speedup over each dense implementation (dense / DGA median) and "XLA
peak GiB", XLA's buffer-assignment peak (arguments + outputs + temporaries - aliased). It is
skipped, not run, when that peak exceeds free host memory (MemAvailable less 2 GiB) or free
device memory, when its per-call time extrapolated quadratically from the previous length
exceeds `--max-seconds`, or when it raises (e.g. RESOURCE_EXHAUSTED). On GPU the JSON also holds
the device's `peak_bytes_in_use`, a process-wide high-water mark. Results go to
`benchmarks/results/attention_<backend>[_quick][_w<W>].{json,png}`.

Expected (the issue's goal): on CPU at L=16K, DGA's forward is at least 3x faster than dense xla
and faster than dense blockwise, its forward+backward at least 2x faster; at L=32K DGA still
runs where dense xla does not fit in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from block_args import parse_blocks
from common import (
    GIB,
    add_attention_args,
    check_attention_args,
    device_peak_bytes,
    environment,
    free_bytes,
    length_label,
    positive_float,
    positive_int,
    positive_ints,
    time_calls,
)
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import dga_jax
from dga_jax import BlockSizes
from dga_jax.compile_stats import xla_peak_bytes

FULL_LENGTHS = (2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (1024, 2048)
MODES = ("fwd", "fwd+bwd")
IMPLS = (
    "dga_pallas_gpu",
    "dga_pallas_tpu",
    "dga_xla",
    "dense_xla",
    "dense_blockwise",
    "dense_cudnn",
)
ONLY_ON = {"dga_pallas_gpu": "gpu", "dga_pallas_tpu": "tpu", "dense_cudnn": "gpu"}
DASH = "\N{EM DASH}"
COLUMNS = f"{'L':>6}  {'mode':<8}{'impl':<22}{'median ms':>11}{'min ms':>11}"
HEADER = f"{COLUMNS}{'speedup':>9}{'XLA peak GiB':>14}  status"


@dataclasses.dataclass
class Record:
    """One (length, mode, implementation) measurement, or why it was skipped."""

    L: int
    mode: str
    impl: str
    median_ms: float | None = None
    min_ms: float | None = None
    times_ms: list[float] = dataclasses.field(default_factory=list)
    xla_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    status: str = "ok"
    reason: str | None = None


def comma_list(text: str) -> list[str]:
    """Split a comma-separated command-line value."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and fill in the defaults that depend on --quick and the backend."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="L in {1K, 2K}, 2 repeats")
    p.add_argument("--lengths", type=positive_ints, help="sequence lengths, e.g. 2048,4096")
    add_attention_args(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on CPU")
    p.add_argument("--modes", type=comma_list, default=list(MODES), help="fwd,fwd+bwd")
    p.add_argument("--impls", type=comma_list, help=f"from {','.join(IMPLS)}")
    p.add_argument("--repeats", type=positive_int, help="timed calls (default 5; --quick: 2)")
    p.add_argument(
        "--max-seconds", type=positive_float, default=180.0, help="skip longer predicted calls"
    )
    p.add_argument(
        "--window",
        type=positive_int,
        help="dense implementations: a sliding window of this many keys (Mistral's); DGA as is",
    )
    args = p.parse_args(argv)
    check_attention_args(p, args)
    backend = jax.default_backend()
    args.lengths = sorted(set(args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)))
    args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.impls is None:
        args.impls = [impl for impl in IMPLS if ONLY_ON.get(impl, backend) == backend]
    _check_tiles(p, args.impls)
    unknown = set(args.modes) - set(MODES)
    unknown |= {impl for impl in args.impls if impl.partition("@")[0] not in IMPLS}
    unknown |= {impl for impl in args.impls if "@" in impl and not _tiled(impl)}
    if unknown:
        p.error(
            f"unknown {sorted(unknown)}; choose from {','.join(MODES + IMPLS)}, "
            "DGA ones @RxK[wW][sS]"
        )
    for flag, chosen in (("--modes", args.modes), ("--impls", args.impls)):
        if not chosen:  # nothing would run, and the results files would be overwritten empty
            p.error(f"{flag}: none given")
    args.modes = [mode for mode in MODES if mode in args.modes]
    args.impls = sorted(dict.fromkeys(args.impls), key=lambda i: IMPLS.index(i.partition("@")[0]))
    args.baseline = next((impl for impl in args.impls if impl.startswith("dga_")), None)
    return args


def _check_tiles(p: argparse.ArgumentParser, impls: list[str]) -> None:
    """`p.error` naming a tile suffix `BlockSizes` refuses (`dga_xla@0x64`), or a launch
    (`w4s3`) on another implementation than "pallas_gpu"."""
    for impl in impls:
        try:
            tiles = _tiled(impl)
        except ValueError as error:
            p.error(f"--impls {impl}: {error}")
        if tiles is not None and tiles.launch and not impl.startswith("dga_pallas_gpu@"):
            p.error(f"--impls {impl}: Triton's warps and stages apply to dga_pallas_gpu only")


def _tiled(impl: str) -> BlockSizes | None:
    """ "dga_...@RxK[wW][sS]" -> its BlockSizes (`block_args`); None for no or a malformed
    suffix."""
    name, _, tiles = impl.partition("@")
    return parse_blocks(tiles) if name.startswith("dga_") else None


def attention(impl: str, args: argparse.Namespace) -> Callable[..., jax.Array]:
    """The attention function that `impl` names, with the DGA settings from `args`."""
    if impl.startswith("dga_"):
        dga = {"group_size": args.group_size, "focal_ratio": args.focal_ratio}
        return functools.partial(
            dga_jax.dga_attention,
            **dga,
            selection=args.selection,
            implementation=impl.partition("@")[0].removeprefix("dga_"),
            block_sizes=_tiled(impl),
        )
    return functools.partial(
        dga_jax.dense_attention, implementation=impl.removeprefix("dense_"), window=args.window
    )


def step(impl: str, mode: str, args: argparse.Namespace) -> Callable[..., Any]:
    """`f(q, k, v)` for "fwd"; `(q, k, v, ct) -> (dq, dk, dv)` for "fwd+bwd"."""
    attn = attention(impl, args)
    if mode == "fwd":
        return attn

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, ct: jax.Array) -> jax.Array:
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct)

    return jax.grad(loss, argnums=(0, 1, 2))


def input_specs(args: argparse.Namespace, length: int, mode: str) -> list[jax.ShapeDtypeStruct]:
    """Shapes of q, k, v (and the cotangent for "fwd+bwd")."""
    q = jax.ShapeDtypeStruct((args.batch, length, args.heads, args.head_dim), args.dtype)
    kv = jax.ShapeDtypeStruct((args.batch, length, args.kv_heads, args.head_dim), args.dtype)
    return [q, kv, kv] + ([q] if mode == "fwd+bwd" else [])


def make_inputs(specs: list[jax.ShapeDtypeStruct]) -> list[jax.Array]:
    """Standard normal arrays for `specs`, from a fixed seed."""
    keys = jax.random.split(jax.random.key(0), len(specs))
    return [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys, specs, strict=True)]


def skip_reason(record: Record, predicted_s: float | None, max_seconds: float) -> str | None:
    """Why `record` must not run (memory, then predicted time), or None."""
    available = free_bytes()
    peak = record.xla_peak_bytes
    if peak is not None and available is not None and peak > available:
        return f"needs {peak / GIB:.1f} GiB, {max(available, 0) / GIB:.1f} GiB free"
    if predicted_s is not None and predicted_s > max_seconds:
        return f"predicted {predicted_s:.3g} s > --max-seconds {max_seconds:g}"
    return None


def measure(record: Record, args: argparse.Namespace, predicted_s: float | None) -> None:
    """Compile, check memory and predicted time, then time `record`'s configuration in place."""
    specs = input_specs(args, record.L, record.mode)
    compiled = jax.jit(step(record.impl, record.mode, args)).lower(*specs).compile()
    record.xla_peak_bytes = xla_peak_bytes(compiled)
    reason = skip_reason(record, predicted_s, args.max_seconds)
    if reason:
        record.status, record.reason = "skipped", reason
        return
    inputs = make_inputs(specs)
    record.times_ms = time_calls(compiled, inputs, args.repeats)
    record.median_ms = statistics.median(record.times_ms)
    record.min_ms = min(record.times_ms)
    record.device_peak_bytes = device_peak_bytes()


def predict_seconds(
    previous: tuple[int, float] | None, length: int, window: int | None = None
) -> float | None:
    """Per-call seconds at `length` from (previous length, its median ms): quadratic in L, or
    linear for a sliding window both lengths exceed (O(L W) work)."""
    if previous is None:
        return None
    prev_length, prev_ms = previous
    linear = window is not None and min(prev_length, length) >= window
    return prev_ms / 1e3 * (length / prev_length) ** (1 if linear else 2)


def fmt_ms(value: float | None) -> str:
    """Milliseconds to one decimal, or a dash."""
    return DASH if value is None else f"{value:.1f}"


def format_row(record: Record, dga_ms: float | None, baseline: str | None) -> str:
    """One fixed-width table line; speedup = this row's time / the baseline DGA's."""
    speedup = DASH
    if record.impl != baseline and dga_ms and record.median_ms is not None:
        speedup = f"{record.median_ms / dga_ms:.2f}x"
    peak = DASH if record.xla_peak_bytes is None else f"{record.xla_peak_bytes / GIB:.3f}"
    status = record.status if record.reason is None else f"{record.status}: {record.reason}"
    cells = f"{record.L:>6}  {record.mode:<8}{record.impl:<22}{fmt_ms(record.median_ms):>11}"
    return f"{cells}{fmt_ms(record.min_ms):>11}{speedup:>9}{peak:>14}  {status}"


def run(args: argparse.Namespace) -> list[Record]:
    """Measure every (L, mode, impl) in increasing L, printing each line as it completes."""
    records: list[Record] = []
    last: dict[tuple[str, str], tuple[int, float]] = {}
    print(HEADER, flush=True)
    for length in args.lengths:
        for mode in args.modes:
            dga_ms = None
            for impl in args.impls:
                record = Record(length, mode, impl)
                try:
                    window = args.window if impl.startswith("dense") else None
                    predicted = predict_seconds(last.get((impl, mode)), length, window)
                    measure(record, args, predicted)
                except Exception as err:  # e.g. RESOURCE_EXHAUSTED: record it and go on
                    lines = str(err).strip().splitlines() or [""]
                    record.status, record.reason = "skipped", f"{type(err).__name__}: {lines[0]}"
                if record.median_ms is not None:
                    last[(impl, mode)] = (length, record.median_ms)
                if impl == args.baseline:
                    dga_ms = record.median_ms
                print(format_row(record, dga_ms, args.baseline), flush=True)
                records.append(record)
                gc.collect()
    return records


def plot(records: list[Record], args: argparse.Namespace, env: dict[str, Any], path: Path) -> None:
    """Median time vs L, log-log, one line per implementation; fwd and fwd+bwd side by side."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    done = [r for r in records if r.median_ms is not None]
    for ax, mode in zip(fig.subplots(1, 2), MODES, strict=True):
        for impl in args.impls:
            points = [(r.L, r.median_ms) for r in done if (r.mode, r.impl) == (mode, impl)]
            if points:
                lengths, times = zip(*points, strict=True)
                ax.plot(lengths, times, marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(args.lengths, labels=[length_label(n) for n in args.lengths])
        ax.set_xticks([], minor=True)
        ax.set(title=mode, xlabel="sequence length L", ylabel="median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend()
    shape = f"B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}"
    dga = f"m={args.group_size}, gamma={args.focal_ratio:g}, {args.selection}"
    fig.suptitle(f"DGA vs dense attention on {env['device_kind']}, {args.dtype}, {shape}; {dga}")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table and write the JSON and PNG."""
    args = parse_args(argv)
    env = environment()
    print(f"{env['device_kind']} ({env['backend']}), {args.dtype}, jax {env['jax_version']}")
    records = run(args)
    print(f"\n{HEADER}")
    dga = {(r.L, r.mode): r.median_ms for r in records if r.impl == args.baseline}
    for record in records:
        print(format_row(record, dga.get((record.L, record.mode)), args.baseline))
    args.out.mkdir(parents=True, exist_ok=True)
    window = f"_w{args.window}" if args.window else ""
    stem = args.out / f"attention_{env['backend']}{'_quick' if args.quick else ''}{window}"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    rows = [dataclasses.asdict(r) for r in records]
    result = {"config": config, "environment": env, "records": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(records, args, env, stem.with_suffix(".png"))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
