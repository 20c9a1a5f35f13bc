"""`benchmarks/profile_attention.py` end to end at a small length: every stage is timed, and the
stages add up to about the whole call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORWARD = ("importance", "selection", "layout", "gather", "prefix walk", "band walk")
BACKWARD = ("backward: prefix walk", "backward: band walk", "backward: rest")


def test_the_profile_times_every_stage_and_they_add_up_to_the_call(tmp_path):
    command = [
        sys.executable,
        "benchmarks/profile_attention.py",
        "--lengths",
        "1024",
        "--repeats",
        "3",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (*FORWARD, "other", *BACKWARD, "DGA forward", "dense blockwise", "matmul peak"):
        assert name in result.stdout, name
    (path,) = tmp_path.glob("profile_attention_*.json")
    (record,) = json.loads(path.read_text())["records"]
    rows = {row["stage"]: row for row in record["stages"]}
    assert list(rows) == [*FORWARD, "other", *BACKWARD]
    assert all(rows[name]["median_ms"] > 0 and rows[name]["share_fwd"] > 0 for name in FORWARD)
    # Timings are the benchmark's business (a shared CPU makes any bound on them flaky); the
    # shares are checked for what holds by construction.
    assert abs(sum(row["share_fwd_bwd"] for row in rows.values()) - 1) < 1e-6
    roof = record["roofline"]
    assert roof["matmul_peak_flops"] > 0
    for part in ("prefix", "band"):
        assert roof["walk_flops"][part] >= roof["exact_flops"][part] > 0
