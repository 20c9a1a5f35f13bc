"""Where one compiled call's time goes, by model scope, on XLA:CPU: a `jax.profiler` trace of the
call, its events matched to the compiled program's HLO instructions and summed by the `op_name`
scope those carry (the model's `jax.named_scope`s and the attention ops' names).

Scopes, first match wins: "attention op" (inside the attention op: `dga_attention`,
`dense_attention`, any `<kind>_attention` the model names), "attention block" (the rest of the
layer's attention half: norm, projections, RoPE), "MLP block" (norm and SwiGLU), and "rest"
(embedding, final norm, logits, loss, the layer scan's stacked residuals, the optimizer, and
instructions with no op_name, such as copies the compiler adds); each split into forward and
backward (`transpose(jvp(...))` in the op name). Loops and calls are not counted themselves,
only the instructions they run, so no event is inside another; XLA:CPU may run independent
instructions at once, so the sums add time over threads and are not wall time. CPU only: on a
GPU the trace's events are kernels and their launches, which this matching would miscount.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

SCOPES = (  # a scope is a path part, or wrapped by a transform: "jvp(mlp_block)"
    ("attention op", re.compile(r"(^|[/(])\w+_attention([/)]|$)")),
    ("attention block", re.compile(r"(^|[/(])attention_block([/)]|$)")),
    ("MLP block", re.compile(r"(^|[/(])mlp_block([/)]|$)")),
)
REST = "rest"
CONTAINERS = (" while(", " conditional(", " call(")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def op_names(hlo_text: str) -> dict[str, str]:
    """Executed instruction -> its op_name ("" where none); loops and calls left out."""
    names = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match and not any(c in match.group(2) for c in CONTAINERS):
            op_name = _OP_NAME.search(line)
            names[match.group(1)] = op_name.group(1) if op_name else ""
    return names


def scope_of(op_name: str) -> tuple[str, str]:
    """(scope, "forward" | "backward") of one instruction."""
    direction = "backward" if "transpose(jvp" in op_name else "forward"
    for scope, pattern in SCOPES:
        if pattern.search(op_name):
            return scope, direction
    return REST, direction


def trace_events(compiled: jax.stages.Compiled, inputs: Sequence[Any]) -> list[dict]:
    """Complete ("X") events of one traced call of `compiled(*inputs)`."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            jax.block_until_ready(compiled(*inputs))
        (path,) = Path(logdir).glob("plugins/profile/*/*.trace.json.gz")
        trace = json.loads(gzip.decompress(path.read_bytes()))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def scope_ms(compiled: jax.stages.Compiled, inputs: Sequence[Any]) -> dict[str, dict[str, float]]:
    """{scope: {"forward": ms, "backward": ms}} of one call (warm it up first)."""
    if jax.default_backend() != "cpu":
        raise ValueError(
            f"trace_scopes reads XLA:CPU traces; on {jax.default_backend()} open the trace in "
            "TensorBoard or Perfetto (train.profile_steps writes one)"
        )
    names = op_names(compiled.as_text())
    scopes = [scope for scope, _ in SCOPES] + [REST]
    totals = {scope: {"forward": 0.0, "backward": 0.0} for scope in scopes}
    for event in trace_events(compiled, inputs):
        if event["name"] in names:
            scope, direction = scope_of(names[event["name"]])
            totals[scope][direction] += event["dur"] / 1e3
    return totals


def print_scopes(variant: str, length: int, scopes: dict[str, dict[str, float]]) -> None:
    """One variant's table: each scope's forward, backward and share of the traced total."""
    total = sum(sum(ms.values()) for ms in scopes.values())
    print(f"\n{variant} at L={length}: traced instructions {total:,.0f} ms")
    print(f"{'scope':<18}{'forward ms':>12}{'backward ms':>13}{'share':>8}")
    for scope, ms in scopes.items():
        share = sum(ms.values()) / total if total else 0.0
        print(f"{scope:<18}{ms['forward']:>12,.1f}{ms['backward']:>13,.1f}{share:>8.1%}")
