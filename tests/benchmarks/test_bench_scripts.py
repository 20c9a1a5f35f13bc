"""Options the scripts take are honoured, or refused: `context_parallel.py --target` for the
train-step rows too, `decode.py --steps` exactly, `prefill.py --breakdown` refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


# A target's compile-only devices stood in for by the fake CPU devices in reverse; the lowering
# records the devices it is given (nothing compiles).
_TARGET_RUN = """
import json, sys
sys.path.insert(0, "benchmarks")
import jax
import context_parallel as cp

target = jax.devices()[::-1]
seen = []


class Lowered:
    def compile(self):
        return None


def lower_train_step(config, devices):
    seen.append([d.id for d in devices])
    return Lowered()


cp.aot.target_devices = lambda name, chips: target
cp.lower_train_step = lower_train_step
cp._attention = cp._row = cp._write = lambda *args: None
cp._markdown = lambda rows: ""
sys.argv = ["context_parallel.py", "--target", "h100", "--lengths", "256", "--parts", "2",
            "--steps", "256"]
cp.main()
print(json.dumps({"seen": seen, "target": [d.id for d in target[:2]]}))
"""


def test_context_parallel_train_steps_compile_for_the_target():
    result = subprocess.run(
        [sys.executable, "-c", _TARGET_RUN], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["seen"] == [out["target"]] * 2  # ulysses and dga, on 2 of the target's devices


class _Decoder:
    """Decode steps without a model: checks the caches have room for every step."""

    def __init__(self, length: int, max_len: int):
        self.position, self.max_len = length, max_len
        self.caches, self.prefill_s = None, 0.0

    def run(self, steps: int) -> list[float]:
        self.position += steps
        assert self.position <= self.max_len, "decoded past the caches"
        return [1.0] * steps


@pytest.mark.parametrize("steps, rounds", [(3, 2), (64, 8), (5, 8)])
def test_decode_times_exactly_the_steps_asked_for(monkeypatch, steps, rounds):
    load_script("trace_scopes")
    load_script("common")
    decode = load_script("decode")
    monkeypatch.setattr(decode, "decoder", lambda g, s, prompt, n: _Decoder(prompt.shape[1], n))
    monkeypatch.setattr(decode, "cache_bytes", lambda caches: 0)
    argv = ["--lengths", "16", "--steps", str(steps), "--rounds", str(rounds), "--warmup", "2"]
    args = decode.parse_args(argv)
    records = decode.measure(args, {"dga": None, "dense": None}, None, 16)
    assert [len(r["times_ms"]) for r in records] == [steps, steps]
    assert [r["max_len"] for r in records] == [16 + 2 + steps] * 2


def test_prefill_refuses_breakdown(tmp_path):
    load_script("trace_scopes")
    load_script("common")
    with pytest.raises(SystemExit, match="--breakdown"):
        load_script("prefill").main(["--lengths", "128", "--breakdown", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
