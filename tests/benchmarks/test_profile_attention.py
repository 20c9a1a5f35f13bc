"""`benchmarks/profile_attention.py` end to end at a small length: every stage is timed, and the
stages add up to about the whole call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORWARD = ("importance", "selection", "layout", "gather", "prefix walk", "band walk")
BACKWARD = ("backward: prefix walk", "backward: band walk", "backward: rest")


@pytest.mark.parametrize("selection", ["global", "streaming"])
def test_the_profile_times_every_stage_and_they_add_up_to_the_call(tmp_path, selection):
    command = [
        sys.executable,
        "benchmarks/profile_attention.py",
        "--lengths",
        "1024",
        "--repeats",
        "3",
        "--selection",
        selection,
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
    # The bounds: the walks' exact FLOPs plus the selection's, which global pays twice per
    # sampled query and key up to it (here 64 sampled queries, j = 15, 31, ..., 1023) and
    # streaming once per key; the backward has no selection, so its bound is higher.
    per_pair = 2 * 128 * 8
    sampled = 2 * per_pair * sum(j + 1 for j in range(15, 1024, 16))
    assert roof["importance_flops"] == (per_pair * 1024 if selection == "streaming" else sampled)
    dense, walk = roof["dense_causal_flops"], roof["exact_flops"]["walk"]
    forward = dense / (walk + roof["importance_flops"])
    assert abs(roof["bound"]["forward"] - forward) < 1e-9 * forward
    assert forward < roof["bound"]["fwd+bwd"] < dense / walk
    t = record["median_ms"]
    ratio = {mode: t[f"dense {mode}"] / t[mode] for mode in ("forward", "fwd+bwd")}
    for mode, share in roof["share_of_bound"].items():
        assert abs(share - ratio[mode] / roof["bound"][mode]) < 1e-9 * share
    assert f"{selection} selection" in result.stdout
    assert "arithmetic bound, forward" in result.stdout


def test_the_triton_kernels_are_profiled_stage_by_stage(tmp_path):
    """--implementation pallas_gpu (interpreted here): importance and the walks are the
    kernels, in the tiles and launch --blocks names; their rates are exact FLOPs / time."""
    command = [sys.executable, "benchmarks/profile_attention.py", "--lengths", "256"]
    command += ["--repeats", "2", "--heads", "2", "--kv-heads", "1", "--head-dim", "32"]
    command += ["--implementation", "pallas_gpu", "--interpret", "--blocks", "64x32w4s3"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DGA pallas_gpu stages" in result.stdout and "exact FLOPs / time" in result.stdout
    (path,) = tmp_path.glob("profile_attention_pallas_gpu_*.json")
    (record,) = json.loads(path.read_text())["records"]
    assert [row["stage"] for row in record["stages"]] == [*FORWARD, "other", *BACKWARD]
    given = dict(block_q=64, block_k=32, num_warps=4, num_stages=3)
    assert {name: record["blocks"][name] for name in given} == given
    roof = record["roofline"]
    assert not roof["walk_flops_counted"] and roof["walk_flops"] == roof["exact_flops"]
    assert all(rate > 0 for rate in roof["dense_achieved_flops"].values())
