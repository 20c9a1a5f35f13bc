"""Wall-clock timing of JAX calls, shared by the benchmarks and the notebooks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def time_calls(fn: Callable[..., Any], inputs: Sequence[Any], repeats: int) -> list[float]:
    """`fn(*inputs)` once to warm up (compile), then `repeats` timed calls, each waited for
    (`jax.block_until_ready`): their wall times in ms."""
    jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append((time.perf_counter() - start) * 1e3)
    return times
