"""`benchmarks/attention.py` end to end at a small length, with a DGA implementation in named
tiles beside its default ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "benchmarks/attention.py", "--quick", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_named_tiles_run_beside_the_default_ones(tmp_path):
    impls = "dense_blockwise,dga_xla@64x32,dga_xla"
    result = _run("--lengths", "256", "--modes", "fwd", "--impls", impls, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("attention_*.json")
    records = json.loads(path.read_text())["records"]
    # DGA first (the speedup's baseline), in the order given, then dense.
    assert [r["impl"] for r in records] == ["dga_xla@64x32", "dga_xla", "dense_blockwise"]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in records)


def test_malformed_tiles_are_named(tmp_path):
    result = _run("--impls", "dga_xla@64", "--out", str(tmp_path))
    assert result.returncode == 2 and "dga_xla@64" in result.stderr
    result = _run("--impls", "dense_xla@64x64", "--out", str(tmp_path))
    assert result.returncode == 2 and "dense_xla@64x64" in result.stderr
    result = _run("--impls", "dga_xla@64x64w4", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "dga_xla@64x64w4: Triton's warps and stages apply to dga_pallas_gpu" in result.stderr
    result = _run("--impls", "dga_pallas_gpu@64x64w6", "--out", str(tmp_path))
    assert result.returncode == 2 and "num_warps must be a power of two <= 32" in result.stderr


def test_a_window_reaches_the_dense_implementations_and_the_file_name(tmp_path):
    impls = "dga_xla,dense_blockwise,dense_xla"
    args = ("--lengths", "256", "--modes", "fwd", "--impls", impls, "--window", "32")
    result = _run(*args, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "attention_cpu_quick_w32.json").read_text())
    assert results["config"]["window"] == 32
    assert all(r["status"] == "ok" for r in results["records"])
    assert _run("--window", "0", "--out", str(tmp_path)).returncode == 2


def test_a_windowed_call_is_predicted_linear_in_the_length():
    attention = load_script("attention")
    assert attention.predict_seconds((1024, 500.0), 4096) == 8.0  # quadratic
    assert attention.predict_seconds((1024, 500.0), 4096, window=1024) == 2.0  # O(L W)
    # below the window the call is still causal attention over its whole length
    assert attention.predict_seconds((512, 500.0), 1024, window=1024) == 2.0
    assert attention.predict_seconds(None, 4096, window=1024) is None
