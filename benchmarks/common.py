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

from dga_jax import DGAConfig
from dga_jax.compile_stats import xla_peak_bytes
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


HOST_MALLOC_SETTINGS = ("GLIBC_TUNABLES", "LD_PRELOAD")  # recorded by `environment`


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
        # How the host allocates memory: XLA:CPU's per-call temporaries fault in fresh pages
        # under glibc's defaults, a share of a CPU run's time (benchmarks/RESULTS.md)
        "host_malloc": {name: os.environ.get(name) for name in HOST_MALLOC_SETTINGS},
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
