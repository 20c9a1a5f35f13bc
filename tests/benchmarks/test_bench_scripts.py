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
    decode = load_script("decode")
    monkeypatch.setattr(decode, "decoder", lambda g, s, prompt, n: _Decoder(prompt.shape[1], n))
    monkeypatch.setattr(decode, "cache_bytes", lambda caches: 0)
    argv = ["--lengths", "16", "--steps", str(steps), "--rounds", str(rounds), "--warmup", "2"]
    args = decode.parse_args(argv)
    records = decode.measure(args, {"dga": None, "dense": None}, None, 16)
    assert [len(r["times_ms"]) for r in records] == [steps, steps]
    assert [r["max_len"] for r in records] == [16 + 2 + steps] * 2


def test_prefill_refuses_breakdown(tmp_path):
    with pytest.raises(SystemExit, match="--breakdown"):
        load_script("prefill").main(["--lengths", "128", "--breakdown", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("steps", [1, 4, 5])
def test_baselines_times_exactly_the_decode_steps_asked_for(monkeypatch, steps):
    baselines = load_script("baselines")
    monkeypatch.setattr(baselines, "decoder", lambda g, s, prompt, n: _Decoder(prompt.shape[1], n))
    monkeypatch.setattr(baselines, "cache_bytes", lambda caches: 0)
    args = baselines.parse_args(["--lengths", "16", "--steps", str(steps)])
    records = baselines.decode_records(16, args)
    assert [len(r["times_ms"]) for r in records] == [steps] * len(baselines.KINDS)


def _replication():
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


# Flags context_parallel.py cannot compile for, each refused up front (they ended the run with a
# traceback part-way), and what it writes for a train-step row: JSON null where no K/V ratio is
# (NaN is not JSON), a plot label in the lengths' own units.
_CONTEXT_PARALLEL = """
import contextlib, io, json, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp
import matplotlib.pyplot as plt
import context_parallel as cp

errors = []
for argv in (["--parts", "16"], ["--lengths", "256", "--parts", "3", "--steps", ""],
             ["--lengths", "256", "--steps", "100", "--parts", "1,8"], ["--target", "foo"]):
    sys.argv = ["context_parallel.py", *argv]
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit):
        cp._parse_args()
    errors.append(err.getvalue().splitlines()[-1])
compiled = jax.jit(jnp.negative).lower(jnp.ones(4)).compile()
row = cp._row("train step tiny_dga", "dga", 1536, 1, compiled, None)
figures = []
plt.close = figures.append
cp._write([row], cp.Path(sys.argv[-1]) / "cp")
json.loads((cp.Path(sys.argv[-1]) / "cp.json").read_text(), parse_constant=float.fromhex)
legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
print(json.dumps({"errors": errors, "kv_ratio": row.kv_ratio, "legend": legend}))
"""


def test_context_parallel_refuses_what_it_cannot_compile_and_writes_strict_json(tmp_path):
    script = _CONTEXT_PARALLEL.replace("sys.argv[-1]", repr(str(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["errors"] == [
        "context_parallel.py: error: --parts 16: more than the 8 devices compiled for",
        "context_parallel.py: error: --lengths 256: not a multiple of --parts 3 (each part holds "
        "L / P)",
        "context_parallel.py: error: --steps 100: not a multiple of --parts 8 (each part holds "
        "L / P)",
        "context_parallel.py: error: --target 'foo': choose cpu or one of v4, v5e, v5p, v6e, "
        "h100, h200",
    ]
    assert out["kv_ratio"] is None
    assert out["legend"] == ["train step tiny_dga, dga, L=1536"]
    assert "| 1,536 | 1 |" in (tmp_path / "cp.md").read_text()


def _failing(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nand more")


def _identity(q, k, v):
    return q


def test_baselines_records_a_failing_attention_kind_and_runs_the_others(monkeypatch):
    baselines = load_script("baselines")
    monkeypatch.setattr(
        baselines, "attention", lambda kind: _failing if kind == "dga" else _identity
    )
    args = baselines.parse_args(["--lengths", "8", "--repeats", "1"])
    dga, dense = (baselines.attention_record(k, "fwd", 8, args) for k in ("dga", "dense"))
    assert dga["status"] == "failed: RuntimeError: RESOURCE_EXHAUSTED: out of memory"
    assert (dga["kind"], dga["median_ms"]) == ("dga", None)
    assert dense["status"] == "ok" and dense["median_ms"] > 0
    baselines.report([dga, dense])  # a table with a missing entry prints


def test_baselines_records_a_kind_that_fails_to_decode_and_times_the_others(monkeypatch):
    baselines = load_script("baselines")
    built = []

    def decoder(graphdef, state, prompt, max_len):
        built.append(None)
        if len(built) == 2:  # the second kind: dga
            _failing()
        return _Decoder(prompt.shape[1], max_len)

    monkeypatch.setattr(baselines, "decoder", decoder)
    monkeypatch.setattr(baselines, "cache_bytes", lambda caches: 0)
    args = baselines.parse_args(["--lengths", "16", "--steps", "2"])
    records = {r["kind"]: r for r in baselines.decode_records(16, args)}
    assert sorted(records) == sorted(baselines.KINDS)
    assert records["dga"]["status"].startswith("failed: RuntimeError: RESOURCE_EXHAUSTED")
    assert all(len(records[k]["times_ms"]) == 2 for k in baselines.KINDS if k != "dga")


def _fake_measure(lengths_that_fail):
    def measure(args, *rest):
        length = rest[-1]
        if length in lengths_that_fail:
            _failing()
        return [
            {"L": length, "variant": v, "median_ms": 1.0, "cache_bytes": 1, "status": "ok"}
            for v in ("dga", "dense")
        ]

    return measure


def test_decode_records_a_length_that_fails_and_keeps_the_others(monkeypatch, tmp_path, capsys):
    decode = load_script("decode")
    monkeypatch.setattr(decode, "measure", _fake_measure({32}))
    decode.main(["--lengths", "16,32", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("decode_*.json")
    records = json.loads(path.read_text())["records"]
    assert [(r["L"], r["variant"], r["status"][:6]) for r in records] == [
        (16, "dga", "ok"),
        (16, "dense", "ok"),
        (32, "dga", "failed"),
        (32, "dense", "failed"),
    ]
    assert path.with_suffix(".png").exists()
    assert "RESOURCE_EXHAUSTED" in capsys.readouterr().out


def test_prefill_records_a_length_that_fails_and_keeps_the_others(monkeypatch, tmp_path):
    prefill = load_script("prefill")

    def measure(args, variant, length):
        if length == 32:
            _failing()
        times = {"forward_ms": 1.0, "prefill_ms": 2.0}
        return {"L": length, **times, "forward_loops": 1, "prefill_loops": 1}

    monkeypatch.setattr(prefill, "measure", measure)
    prefill.main(["--lengths", "32,16", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("prefill_*.json")
    records = json.loads(path.read_text())["records"]
    assert [(r["L"], r["status"][:6]) for r in records] == [(32, "failed"), (16, "ok")]


def test_importance_records_a_variant_that_fails_and_times_the_others(monkeypatch):
    importance = load_script("importance")
    args = importance.parse_args(
        ["--interpret", "--repeats", "1", "--heads", "2", "--kv-heads", "2", "--head-dim", "16"]
    )
    working = importance.variants(args)["xla"]
    monkeypatch.setattr(
        importance, "variants", lambda args: {"triton 64x64": _failing, "xla": working}
    )
    failed, xla = importance.measure(64, args)
    assert failed["status"] == "failed: RuntimeError: RESOURCE_EXHAUSTED: out of memory"
    assert xla["status"] == "ok" and xla["median_ms"] > 0 and xla["relative_error"] == 0
    importance.report([failed, xla])
