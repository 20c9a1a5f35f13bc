"""`dga_jax.compile_stats.collectives` on a live XLA:GPU compile (an H100 target): each async
collective counts what its `-done` returns (combined ones: all their arrays)."""

from __future__ import annotations

import math
import re

import pytest

from dga_jax import aot
from dga_jax.compile_stats import collectives

pytestmark = pytest.mark.aot

_DONE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|reduce-scatter|all-to-all)-done\(")
_ARRAY = re.compile(r"\b(bf16|f32)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f32": 4}


def _done_bytes(hlo: str) -> dict[str, int]:
    """op -> bytes of all its async `-done` results (the arrays the collective produced)."""
    found = {}
    for match in filter(None, map(_DONE.search, hlo.splitlines())):
        arrays = _ARRAY.findall(match[1])
        size = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",")) for t, dims in arrays)
        found[match[2]] = found.get(match[2], 0) + size
    return found


def test_async_collectives_count_their_results():
    devices = aot.target_devices("h100", chips=2)
    lowered = aot.lower_context_attention(
        devices,
        (1, 1, 2, 1),
        strategy="dga",
        seq_len=512,
        heads=4,
        kv_heads=4,
        implementation="xla",
    )
    compiled = lowered.compile()
    done = _done_bytes(compiled.as_text())
    assert done.get("all-gather"), "no async all-gather: nothing checked"
    counted = {}
    for c in collectives(compiled):
        counted[c.op] = counted.get(c.op, 0) + c.bytes
    assert {op: counted[op] for op in done} == done
