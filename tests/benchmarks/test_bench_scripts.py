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


@pytest.mark.parametrize("steps", [1, 4, 5])
def test_baselines_times_exactly_the_decode_steps_asked_for(monkeypatch, steps):
    load_script("trace_scopes")
    load_script("common")
    load_script("decode")
    baselines = load_script("baselines")
    monkeypatch.setattr(baselines, "decoder", lambda g, s, prompt, n: _Decoder(prompt.shape[1], n))
    monkeypatch.setattr(baselines, "cache_bytes", lambda caches: 0)
    args = baselines.parse_args(["--lengths", "16", "--steps", str(steps)])
    records = baselines.decode_records(16, args)
    assert [len(r["times_ms"]) for r in records] == [steps] * len(baselines.KINDS)


def _replication():
    load_script("trace_scopes")
    load_script("common")
    return load_script("eval_replication")


def test_replication_stops_the_other_training_when_one_fails(monkeypatch, tmp_path):
    replication, started = _replication(), []

    def train(kind, corpus, out, size):
        code = "import sys; sys.exit(3)" if kind == "dense" else "import time; time.sleep(60)"
        started.append(subprocess.Popen([sys.executable, "-c", code]))
        return started[-1]

    monkeypatch.setattr(replication, "train", train)
    with pytest.raises(RuntimeError, match="training failed"):
        replication.train_all(tmp_path / "corpus", tmp_path, {"steps": 2})
    assert [run.poll() for run in started][0] == 3
    assert started[1].poll() is not None, "the dga training outlived the failed run"


def test_replication_hands_the_trainers_absolute_paths(monkeypatch, tmp_path):
    """The trainers run in the repository root: a relative --out must not move there."""
    replication, seen = _replication(), {}
    monkeypatch.chdir(tmp_path)
    runs = (tmp_path / "runs").resolve()
    args = replication.parse_args(["--out", "runs"])
    assert args.out == runs
    monkeypatch.setattr(
        replication.subprocess, "Popen", lambda command, cwd: seen.update(c=command)
    )
    replication.train("dga", args.out / "corpus", args.out, replication.sizes(True))
    assert f"--workdir={runs / 'train_dga'}" in seen["c"]
