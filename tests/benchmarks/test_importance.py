"""`benchmarks/importance.py` end to end at small shapes, the kernels in Pallas' interpreter:
every variant is timed at every length, and the kernels' scores match XLA's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "benchmarks/importance.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_kernels_are_timed_beside_xla_and_agree(tmp_path):
    result = _run(
        *("--interpret", "--lengths", "256,300", "--repeats", "2", "--tiles", "64x64,16x32"),
        *("--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--out", str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("importance_*.json")
    records = json.loads(path.read_text())["records"]
    names = ["xla", "triton 64x64", "triton 16x32"]
    assert [(r["L"], r["variant"]) for r in records] == [(n, v) for n in (256, 300) for v in names]
    for r in records:
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["tflops"] > 0
        assert r["relative_error"] < 1e-5, r
        assert r["variant"] in result.stdout


def test_without_a_gpu_the_kernels_need_interpret(tmp_path):
    result = _run("--lengths", "256", "--out", str(tmp_path))
    assert result.returncode == 2 and "add --interpret" in result.stderr
