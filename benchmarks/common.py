"""Measurement helpers shared by the benchmark scripts: timing, memory, environment, options."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from trace_scopes import print_scopes, scope_ms

from dga_jax import DGAConfig, ModelConfig
from dga_jax.compile_stats import xla_peak_bytes
from dga_jax.model.config import PRESETS
from dga_jax.timing import time_calls

GIB = 2**30
HOST_HEADROOM = 2 * GIB


def free_bytes() -> int | None:
    """Memory a run may use: MemAvailable less headroom on CPU, the device's free memory else."""
    if jax.default_backend() == "cpu":
        meminfo = Path("/proc/meminfo")
        text = meminfo.read_text() if meminfo.exists() else ""
        found = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
        return int(found[1]) * 1024 - HOST_HEADROOM if found else None
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def device_peak_bytes() -> int | None:
    """The GPU's `peak_bytes_in_use` (process-wide), if it reports one."""
    if jax.default_backend() != "gpu":
        return None
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def environment() -> dict[str, Any]:
    """Versions, device and machine the benchmark ran on."""
    return {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def length_label(length: int) -> str:
    """2048 -> "2K"."""
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


@dataclasses.dataclass
class Calls:
    """Jitted functions with their inputs, compiled and warmed up as they are added."""

    calls: dict[str, tuple[Callable[..., Any], list[Any]]] = dataclasses.field(default_factory=dict)

    def add(self, name: str, fn: Callable[..., Any], *inputs: Any) -> Any:
        """Compile and run `fn(*inputs)` once; its output (the next stage's input)."""
        return self.add_compiled(name, jax.jit(fn), *inputs)

    def add_compiled(self, name: str, compiled: Callable[..., Any], *inputs: Any) -> Any:
        """`add` for a function already jitted or compiled (`jax.stages.Compiled`); one that
        raises is not kept (`time_ms` would run it again)."""
        output = jax.block_until_ready(compiled(*inputs))
        self.calls[name] = (compiled, list(inputs))
        return output

    def time_ms(self, repeats: int) -> dict[str, list[float]]:
        """`repeats` rounds, each timing every call once (load changes hit all alike)."""
        times = {name: [] for name in self.calls}
        for _ in range(repeats):
            for name, (fn, inputs) in self.calls.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                times[name].append((time.perf_counter() - start) * 1e3)
        return times


def time_variant(
    compiled: jax.stages.Compiled, inputs: list[Any], tokens: int, repeats: int
) -> dict[str, Any]:
    """Times `compiled` alone (`repeats` calls after a warm-up) unless it does not fit."""
    record = fit_record(compiled)
    if record["status"] != "ok":
        return record
    return timed_record(record, time_calls(compiled, inputs, repeats), tokens)


def fit_record(compiled: jax.stages.Compiled) -> dict[str, Any]:
    """A record with XLA's peak, status "ok" or "skipped: ..." where it exceeds free memory."""
    peak, free = xla_peak_bytes(compiled), free_bytes()
    record = _untimed(peak)
    if peak is not None and free is not None and peak > free:
        return {**record, "status": f"skipped: needs {peak / GIB:.1f} GiB, {free / GIB:.1f} free"}
    return {**record, "status": "ok"}


def failed_record(err: Exception) -> dict[str, Any]:
    """The record of a variant that failed to build, compile or run: status names the error."""
    first = (str(err).strip().splitlines() or [""])[0]
    return {**_untimed(None), "status": f"failed: {type(err).__name__}: {first}"}


def _untimed(peak: int | None) -> dict[str, Any]:
    return {"xla_peak_bytes": peak, "median_ms": None, "tokens_per_s": None, "times_ms": []}


def timed_record(record: dict[str, Any], times: list[float], tokens: int) -> dict[str, Any]:
    """`record` with the times (ms), their median and tokens/s from the median."""
    median = statistics.median(times)
    return {
        **record,
        "median_ms": median,
        "times_ms": times,
        "tokens_per_s": tokens / (median / 1e3),
    }


def report_variants(records: list[dict]) -> None:
    """Prints L, variant, median ms, tokens/s, DGA's speedup and XLA peak per record: the
    speedup is this record's time over that of the first DGA variant timed at the same L."""
    print(
        f"{'L':>6}  {'variant':<16}{'median ms':>11}{'tokens/s':>11}{'DGA speedup':>13}"
        f"{'XLA peak GiB':>14}  status"
    )
    dga = {}  # L -> (variant, ms) of the first DGA variant timed there
    for r in records:
        if VARIANTS[r["variant"]][0] == "dga" and r["median_ms"]:
            dga.setdefault(r["L"], (r["variant"], r["median_ms"]))
    for r in records:
        ms, (reference, dga_ms) = r["median_ms"], dga.get(r["L"], (None, None))
        speedup = "—" if r["variant"] == reference or not (ms and dga_ms) else f"{ms / dga_ms:.2f}x"
        ms_text = "—" if ms is None else f"{ms:.1f}"
        tok_text = "—" if ms is None else f"{r['tokens_per_s']:.0f}"
        peak = r["xla_peak_bytes"]
        peak_text = "—" if peak is None else f"{peak / GIB:.2f}"
        print(
            f"{length_label(r['L']):>6}  {r['variant']:<16}{ms_text:>11}{tok_text:>11}"
            f"{speedup:>13}{peak_text:>14}  {r['status']}"
        )


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma list of ints >= 1, e.g. "4096,16384"."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"no lengths in {text!r}")
    return [positive_int(item) for item in items]


def positive_ints_or_none(text: str) -> list[int]:
    """argparse type: `positive_ints`, or none for an empty value ('')."""
    return positive_ints(text) if text.strip() else []


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def out_dir(text: str) -> Path:
    """argparse type: a folder for the results, made now: a path that cannot be one (a file,
    no permission) is refused before the run, not after it when its results would be lost."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot make folder {text!r}: {error}") from None
    return path


def check_dga_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` naming a DGA setting `DGAConfig` refuses (before any variant runs)."""
    try:
        DGAConfig(args.group_size, args.focal_ratio, args.selection)
    except ValueError as error:
        parser.error(f"--group-size / --focal-ratio: {error}")


def check_heads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` unless `args.heads` query heads share `args.kv_heads` key/value heads."""
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")


def check_attention_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` for shapes or DGA settings no variant could run (`add_attention_args`)."""
    check_heads(parser, args)
    check_dga_args(parser, args)


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """The options of the attention-level benchmarks: shapes, DGA settings, output folder."""
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8, help="query heads Hq")
    parser.add_argument("--kv-heads", type=positive_int, default=8, help="key/value heads Hkv")
    parser.add_argument("--head-dim", type=positive_int, default=128)
    add_dga_args(parser)
    parser.add_argument("--out", type=out_dir, default=Path(__file__).resolve().parent / "results")


def add_dga_args(parser: argparse.ArgumentParser) -> None:
    """DGA's settings: group size, focal ratio, selection rule."""
    parser.add_argument("--group-size", type=int, default=16, help="DGA group size m")
    parser.add_argument("--focal-ratio", type=float, default=0.1, help="DGA focal ratio gamma")
    parser.add_argument("--selection", choices=("global", "streaming"), default="global")


def write_results(name: str, args: Any, env: dict[str, Any], records: list[dict]) -> Path:
    """`<args.out>/<name>_<backend>[_quick].json` with the arguments, environment and records."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}_{env['backend']}{'_quick' if args.quick else ''}.json"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"config": config, "environment": env, "records": records}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# Model-level benchmark variants: name -> (ModelConfig.attention, ModelConfig.attention_impl).
VARIANTS = {
    "dga_xla": ("dga", "xla"),
    "dga_pallas_gpu": ("dga", "pallas_gpu"),
    "dga_pallas_tpu": ("dga", "pallas_tpu"),
    "dense_xla": ("dense", "xla"),
    "dense_blockwise": ("dense", "blockwise"),
    "dense_cudnn": ("dense", "cudnn"),
}
DEFAULT_VARIANTS = "dga_xla,dense_xla,dense_blockwise"  # what runs on any backend (CPU)


def variant_config(args: argparse.Namespace, variant: str) -> ModelConfig:
    """The model of `args.preset` (with `args.layers` layers if given) and `variant` attention,
    its max_position raised to the longest of `args.lengths`."""
    attention, impl = VARIANTS[variant]
    scan = None if args.scan_layers is None else args.scan_layers == "true"
    given = {"num_layers": args.layers, "dtype": args.dtype, "scan_layers": scan}
    # 7B's 4K max_position would refuse the 16K rows the benchmarks time (the model checks).
    positions = max(PRESETS[args.preset].max_position, *args.lengths)
    return ModelConfig.preset(
        args.preset,
        max_position=positions,
        attention=attention,
        attention_impl=impl,
        dga=DGAConfig(args.group_size, args.focal_ratio, args.selection),
        **{name: value for name, value in given.items() if value is not None},
    )


def first_dga(variants: list[str]) -> str | None:
    """The first DGA variant named (the model `prefill.py` measures)."""
    return next((v for v in variants if VARIANTS[v][0] == "dga"), None)


def parse_variant_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    """Arguments of the model-level benchmarks (preset, lengths, batch, DGA settings)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=positive_int, default=None, help="default: the preset's")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="compute; the preset's"
    )
    parser.add_argument(
        "--scan-layers", choices=("true", "false"), default=None, help="default: the preset's"
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma list of {','.join(VARIANTS)}; the first DGA one timed is the speedups' base",
    )
    parser.add_argument("--lengths", type=positive_ints, help="comma list; default 4096,16384")
    parser.add_argument("--batch", type=positive_int, default=1)
    add_dga_args(parser)
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument(
        "--breakdown", action="store_true", help="also trace one call each: time by model scope"
    )
    parser.add_argument("--out", type=out_dir, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.variants = list(dict.fromkeys(args.variants.split(",")))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    check_dga_args(parser, args)
    if args.breakdown and jax.default_backend() != "cpu":  # refused now, not after the timing
        parser.error(f"--breakdown reads XLA:CPU traces, not {jax.default_backend()}'s")
    args.lengths = args.lengths or ([1024, 2048] if args.quick else [4096, 16384])
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def run_variants(name: str, what: str, prepare: Callable[..., tuple], args) -> None:
    """Times every variant at every length in turns, prints the table and writes the JSON.

    `prepare(args, variant, length)` -> (compiled, inputs): one call of the variant. At each
    length every variant that fits is compiled and warmed up, then timed in `args.repeats`
    rounds of one call each (`Calls`), so a change in the machine's load hits all alike.
    """
    env = environment()
    dga = f"m={args.group_size}, gamma={args.focal_ratio:g}, {args.selection} selection"
    print(f"{args.preset} {what} on {env['device_kind']}, B={args.batch}, DGA {dga}")
    records = [r for n in args.lengths for r in variant_records(prepare, args, n)]
    report_variants(records)
    for r in records:
        if "scopes_ms" in r:
            print_scopes(r["variant"], r["L"], r["scopes_ms"])
    print(f"wrote {write_results(name, args, env, records)}")


def variant_records(prepare: Callable[..., tuple], args, length: int) -> list[dict]:
    """Each variant's record at `length`, timed in turns with the others (`run_variants`);
    with `args.breakdown`, then one traced call each (`trace_scopes.scope_ms`)."""
    calls, records = Calls(), {}
    for variant in args.variants:
        try:
            compiled, inputs = prepare(args, variant, length)
            records[variant] = {"L": length, "variant": variant, **fit_record(compiled)}
            if records[variant]["status"] == "ok":
                calls.add_compiled(variant, compiled, *inputs)
        except Exception as err:  # a variant this backend rejects, or out of memory: go on
            records[variant] = {"L": length, "variant": variant, **failed_record(err)}
    tokens = args.batch * length
    for variant, times in calls.time_ms(args.repeats).items():
        records[variant] = timed_record(records[variant], times, tokens)
    if args.breakdown:
        for variant, (compiled, inputs) in calls.calls.items():
            records[variant]["scopes_ms"] = scope_ms(compiled, inputs)
    return list(records.values())
