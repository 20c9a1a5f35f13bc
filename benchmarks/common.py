"""Measurement helpers shared by the benchmark scripts: timing, memory, environment."""

from __future__ import annotations

import datetime
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import jax

GIB = 2**30
HOST_HEADROOM = 2 * GIB


def xla_peak_bytes(compiled: jax.stages.Compiled) -> int | None:
    """XLA's buffer-assignment peak: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    temp = m.temp_size_in_bytes
    return m.argument_size_in_bytes + m.output_size_in_bytes + temp - m.alias_size_in_bytes


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


def time_calls(compiled: jax.stages.Compiled, inputs: list[jax.Array], repeats: int) -> list[float]:
    """One warm-up call, then `repeats` timed calls in ms."""
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append((time.perf_counter() - start) * 1e3)
    return times


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
