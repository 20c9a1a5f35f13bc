"""Where one compiled call's time goes, by model scope: a `jax.profiler` trace of the call, its
events matched to the compiled program's HLO instructions and summed by the `op_name` scope
those carry (the model's `jax.named_scope`s and the attention ops' names).

Scopes, first match wins: "attention op" (inside `dga_attention` or `dense_attention`),
"attention block" (the rest of the layer's attention half: norm, projections, RoPE), "MLP block"
(norm and SwiGLU), and "rest" (embedding, final norm, logits, loss, the layer scan's stacked
residuals, the optimizer); each split into forward and backward (`transpose(jvp(...))` in the
op name). Loops and calls are not counted themselves, only the instructions they run, so the
events do not overlap. On XLA:CPU every executed instruction is an event; a backend whose events
are not HLO instruction names (GPU kernels) leaves them out.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax

SCOPES = (
    ("attention op", ("dga_attention", "dense_attention")),
    ("attention block", ("attention_block",)),
    ("MLP block", ("mlp_block",)),
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
    for scope, markers in SCOPES:
        if any(marker in op_name for marker in markers):
            return scope, direction
    return REST, direction


def trace_events(compiled, inputs: list, logdir: Path) -> list[dict]:
    """Complete ("X") events of one traced call of `compiled(*inputs)`."""
    jax.profiler.start_trace(str(logdir), create_perfetto_trace=True)
    jax.block_until_ready(compiled(*inputs))
    jax.profiler.stop_trace()
    (path,) = logdir.glob("plugins/profile/*/*.trace.json.gz")
    trace = json.loads(gzip.decompress(path.read_bytes()))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def scope_ms(compiled, inputs: list) -> dict[str, dict[str, float]]:
    """{scope: {"forward": ms, "backward": ms}} of one call (warm it up first)."""
    names = op_names(compiled.as_text())
    totals = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    with tempfile.TemporaryDirectory() as logdir:
        for event in trace_events(compiled, inputs, Path(logdir)):
            if event["name"] in names:
                scope, direction = scope_of(names[event["name"]])
                totals[scope][direction] += event["dur"] / 1e3
    order = [scope for scope, _ in SCOPES] + [REST]
    return {scope: totals[scope] for scope in order}


def print_scopes(variant: str, length: int, scopes: dict[str, dict[str, float]]) -> None:
    """One variant's table: each scope's forward, backward and share of the traced total."""
    total = sum(sum(ms.values()) for ms in scopes.values())
    print(f"\n{variant} at L={length}: traced instructions {total:,.0f} ms")
    print(f"{'scope':<18}{'forward ms':>12}{'backward ms':>13}{'share':>8}")
    for scope, ms in scopes.items():
        share = sum(ms.values()) / total if total else 0.0
        print(f"{scope:<18}{ms['forward']:>12,.1f}{ms['backward']:>13,.1f}{share:>8.1%}")
