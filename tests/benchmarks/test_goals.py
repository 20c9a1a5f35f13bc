"""`benchmarks/goals.py`: each goal's ratio read from its script's records, the median over runs
judged against the target, and a quick run end to end (one process per run)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.benchmarks.scripts import load_script

goals = load_script("goals")


def _record(impl: str, median_ms: float, mode: str = "fwd", status: str = "ok") -> dict:
    return {"impl": impl, "mode": mode, "median_ms": median_ms, "status": status}


def test_ratio_is_dense_over_dga_in_the_goals_mode():
    records = [
        _record("dga_xla", 100.0, "fwd"),
        _record("dense_blockwise", 450.0, "fwd"),
        _record("dga_xla", 300.0, "fwd+bwd"),
        _record("dense_blockwise", 900.0, "fwd+bwd"),
    ]
    assert goals.ratio(records, "fwd") == pytest.approx(4.5)
    assert goals.ratio(records, "fwd+bwd") == pytest.approx(3.0)


def test_ratio_of_model_variants_and_of_a_failed_variant():
    variants = [{"variant": "dga_xla", "median_ms": 2.0, "status": "ok"}]
    variants.append({"variant": "dense_blockwise", "median_ms": 7.0, "status": "ok"})
    assert goals.ratio(variants, None) == pytest.approx(3.5)
    failed = [_record("dga_xla", 100.0, status="failed"), _record("dense_blockwise", 450.0)]
    assert goals.ratio(failed, "fwd") is None


def test_a_goal_is_judged_on_the_median_of_its_runs():
    goal = goals.BY_KEY["train16"]  # 3.5x
    record = goals.summary(goal, [3.2, 3.6, None, 3.7, 3.4], quick=False)
    assert record["median"] == pytest.approx(3.5)
    assert (record["runs_met"], record["met"], record["length"]) == (2, True, 16384)
    assert not goals.summary(goal, [3.2, 3.6, 3.4], quick=False)["met"]
    assert not goals.summary(goal, [None, None, 3.9], quick=False)["met"]  # 1 run of 3 is not
    assert "failed" in goals.table([record])


@pytest.mark.parametrize("given", ["attn16_fwd,train64", "train16,train16"])
def test_unknown_or_repeated_goals_are_refused(given, capsys):
    with pytest.raises(SystemExit):
        goals.parse_args(["--goals", given])
    assert given in capsys.readouterr().err


_SKIPPED = """
import json, pathlib, sys
records = [{"impl": "dga_xla", "mode": "fwd", "status": "skipped", "reason": "needs 9 GiB"},
           {"impl": "dense_blockwise", "mode": "fwd", "status": "ok", "median_ms": 1.0}]
pathlib.Path(sys.argv[1], "attention_cpu.json").write_text(json.dumps({"records": records}))
"""


@pytest.mark.parametrize(
    "script, timeout, why",
    [
        (_SKIPPED, 60.0, "dga_xla: skipped needs 9 GiB"),
        ("import time; time.sleep(30)", 0.5, "no result within --timeout 0.5 s"),
    ],
)
def test_a_failed_run_says_why(script, timeout, why, monkeypatch, capsys):
    monkeypatch.setattr(
        goals.Goal, "command", lambda self, args, out: [sys.executable, "-c", script, str(out)]
    )
    args = goals.parse_args(["--quick", "--timeout", str(timeout)])
    assert goals.run_once(goals.BY_KEY["attn16_fwd"], args, dict(os.environ)) is None
    assert f"attn16_fwd: run failed: {why}" in capsys.readouterr().err


def test_a_quick_run_measures_each_goal_in_a_process_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")  # kept: set already
    goals.main(["--quick", "--goals", "attn16_fwd,attn32_bwd", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("goals_*_quick.json")
    result = json.loads(path.read_text())
    by_goal = {record["goal"]: record for record in result["goals"]}
    assert by_goal.keys() == {"attn16_fwd", "attn32_bwd"}
    for record in by_goal.values():
        (ratio,) = record["ratios"]
        assert ratio > 0 and record["median"] == ratio
    assert by_goal["attn32_bwd"]["length"] == 2048
    assert result["environment"]["host_malloc"]["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1"
