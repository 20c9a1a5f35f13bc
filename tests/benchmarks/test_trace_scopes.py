"""`benchmarks/trace_scopes.py`: a traced call's instructions summed by model scope, forward and
backward; and `train_step.py --breakdown` end to end at a small length."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("trace_scopes", ROOT / "benchmarks/trace_scopes.py")
trace_scopes = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(trace_scopes)
SCOPES = [*(scope for scope, _ in trace_scopes.SCOPES), trace_scopes.REST]

HLO = """
ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %while.3 = (s32[], f32[4]{0}) while(%tuple.1), condition=%cond, body=%body
  %call.4 = f32[4]{0} call(%p), to_apply=%g
  %conditional.5 = f32[4]{0} conditional(%i, %p, %p), branch_computations={%a, %b}
  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%f, metadata={op_name="jit(f)/mlp_block/mul"}
  %fusion.2 = (f32[4]{0}, f32[4]{0}) fusion(%p), kind=kLoop, calls=%h, metadata={op_name="jit(f)/x"}
  add.6 = f32[4]{0} add(%p, %p)
  ROOT %copy.2 = f32[4]{0} copy(%fusion.1)
}
"""


def test_instructions_map_to_their_op_names_and_loops_and_calls_are_left_out():
    assert trace_scopes.op_names(HLO) == {
        "p": "",
        "fusion.1": "jit(f)/mlp_block/mul",
        "fusion.2": "jit(f)/x",
        "add.6": "",
        "copy.2": "",
    }


def test_scopes_match_in_order_and_transposes_are_backward():
    scope_of = trace_scopes.scope_of
    forward = "jit(step)/while/body/attention_block/dga_attention/jit(_dga)/dot_general"
    backward = "jit(step)/transpose(jvp())/while/body/attention_block/btd,dhk->bthk/dot_general"
    assert scope_of(forward) == ("attention op", "forward")
    assert scope_of(backward) == ("attention block", "backward")
    sinks = "jit(step)/transpose(jvp())/attention_block/streaming_llm_attention/exp"
    assert scope_of(sinks) == ("attention op", "backward")
    assert scope_of("jit(step)/transpose(jvp())/mlp_block/mul") == ("MLP block", "backward")
    assert scope_of("jit(f)/transpose(jvp(mlp_block))/dot_general") == ("MLP block", "backward")
    assert scope_of("jit(f)/jvp(attention_block)/dense_attention/tanh")[0] == "attention op"
    assert scope_of("jit(f)/jvp(attention_blocks)/mul") == ("rest", "forward")
    assert scope_of("jit(step)/jvp(btd,dv->btv)/dot_general") == ("rest", "forward")
    assert scope_of("") == ("rest", "forward")


def test_a_traced_gradient_is_split_by_scope_and_direction():
    def loss(x, w):
        with jax.named_scope("attention_block"), jax.named_scope("dense_attention"):
            h = jnp.tanh(x @ w)
        with jax.named_scope("mlp_block"):
            h = jnp.sin(h @ w.T)
        return jnp.sum(h)

    x, w = jax.random.normal(jax.random.key(0), (2, 512, 512))
    compiled = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile()
    jax.block_until_ready(compiled(x, w))
    scopes = trace_scopes.scope_ms(compiled, [x, w])
    assert list(scopes) == SCOPES
    for scope in ("attention op", "MLP block"):
        assert scopes[scope]["forward"] > 0 and scopes[scope]["backward"] > 0, scopes


def test_the_train_step_benchmark_breaks_each_variant_down(tmp_path):
    command = [sys.executable, "benchmarks/train_step.py", "--lengths", "256", "--repeats", "1"]
    command += ["--breakdown", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "train_step_cpu.json").read_text())["records"]
    assert [r["variant"] for r in records] == ["dga_xla", "dense_xla", "dense_blockwise"]
    for record in records:
        scopes = record["scopes_ms"]
        assert list(scopes) == SCOPES
        for scope in ("attention op", "MLP block"):
            assert scopes[scope]["forward"] > 0 and scopes[scope]["backward"] > 0, record
        assert f"{record['variant']} at L=256: traced instructions" in result.stdout
