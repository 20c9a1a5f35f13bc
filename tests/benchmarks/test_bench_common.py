"""`benchmarks/common.py`'s records and timing rounds, and the scripts' optional length lists:
the median of an even number of calls, a variant that fails on its first run, '' for none."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from tests.benchmarks.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _common():
    return load_script("common")


def _variants():
    return load_script("variants")


def test_the_median_of_an_even_number_of_calls_is_the_mean_of_the_middle_two():
    times = [10.0, 40.0, 20.0, 30.0]
    record = _common().timed_record({"status": "ok"}, times, tokens=1000)
    assert record["median_ms"] == statistics.median(times)
    assert record["tokens_per_s"] == 1000 / (statistics.median(times) / 1e3)
    assert record["times_ms"] == times


class _FailsWhenRun:
    """A compiled variant that fits XLA's estimate but fails when run (RESOURCE_EXHAUSTED)."""

    def memory_analysis(self):
        return None

    def __call__(self, *inputs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")


def test_a_variant_that_fails_when_run_is_recorded_and_the_others_are_timed():
    negated = jax.jit(jnp.negative).lower(jnp.ones(4)).compile()

    def prepare(args, variant, length):
        return (_FailsWhenRun() if variant == "dense_xla" else negated), [jnp.ones(4)]

    args = argparse.Namespace(variants=["dga_xla", "dense_xla"], batch=2, repeats=2)
    args.breakdown = False
    dga, dense = _variants().variant_records(prepare, args, 8)
    assert dense["status"] == "failed: RuntimeError: RESOURCE_EXHAUSTED: out of memory"
    assert dense["median_ms"] is None and dense["times_ms"] == []
    assert dga["status"] == "ok" and len(dga["times_ms"]) == 2 and dga["median_ms"] > 0


def test_calls_keeps_only_the_calls_that_ran():
    calls = _common().Calls()
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        calls.add_compiled("fails", _FailsWhenRun())
    calls.add("runs", jnp.negative, jnp.ones(4))
    assert list(calls.time_ms(1)) == ["runs"]


_PARSE = """
import json, sys
sys.path.insert(0, "benchmarks")
import aot_compile, context_parallel
sys.argv = ["aot_compile.py", "--tiny-lengths", "", "--recipes", "", "--long-recipes", ""]
tiny = aot_compile._parse_args().tiny_lengths
sys.argv = ["context_parallel.py", "--steps", ""]
print(json.dumps([tiny, context_parallel._parse_args().steps]))
"""


def test_an_empty_length_list_means_none_where_the_help_says_so():
    """`aot_compile.py --tiny-lengths ''` and `context_parallel.py --steps ''`, as documented."""
    result = subprocess.run(
        [sys.executable, "-c", _PARSE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [[], []]
    assert _common().positive_ints_or_none("256,512") == [256, 512]


def test_breakdown_off_cpu_is_refused_before_anything_runs(monkeypatch, capsys):
    """trace_scopes reads XLA:CPU traces only: on a GPU the run would end after the timing."""
    variants = _variants()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(SystemExit) as exit_info:
        variants.parse_variant_args("test", ["--breakdown"])
    assert (
        exit_info.value.code == 2 and "--breakdown reads XLA:CPU traces" in capsys.readouterr().err
    )
    assert variants.parse_variant_args("test", []).breakdown is False


def test_scan_layers_is_the_presets_unless_given():
    variants = _variants()
    scanned = [
        variants.variant_config(variants.parse_variant_args("test", flags), "dga_xla").scan_layers
        for flags in ([], ["--scan-layers", "true"], ["--scan-layers", "false"])
    ]
    assert scanned == [False, True, False]  # the tiny preset unrolls its two layers


def test_the_environment_records_how_the_host_allocates_memory(monkeypatch):
    """The malloc settings change a CPU run's times by a fifth (benchmarks/RESULTS.md): the
    results must say which ones a run had."""
    tunables = "glibc.malloc.mmap_max=0"
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = _common().environment()
    assert env["host_malloc"] == {"GLIBC_TUNABLES": tunables, "LD_PRELOAD": None}
    json.dumps(env)  # written into the results JSON as it is
