"""`config.train.profile_steps`: the trace covers the profiled steps this process runs."""

from __future__ import annotations

import logging

import pytest

from train import profiler


@pytest.fixture
def traces(monkeypatch) -> list[str]:
    """The calls to jax.profiler's start_trace / stop_trace, in order."""
    calls = []

    def start_trace(directory, **options):
        calls.append("start")

    def stop_trace():
        calls.append("stop")

    monkeypatch.setattr(profiler.jax.profiler, "start_trace", start_trace)
    monkeypatch.setattr(profiler.jax.profiler, "stop_trace", stop_trace)
    return calls


def run_steps(step_profiler: profiler.StepProfiler, first: int, last: int) -> list[int]:
    """Runs steps first..last (then the run's end); returns those that ran inside the trace."""
    traced = []
    for step in range(first, last + 1):
        with step_profiler.annotate(step):
            if step_profiler.active:
                traced.append(step)
        step_profiler.finished(step, None)
    step_profiler.close()
    return traced


@pytest.mark.parametrize("start, traced", [(0, [3, 4, 5]), (2, [3, 4, 5]), (3, [4, 5]), (4, [5])])
def test_the_trace_covers_the_profiled_steps_the_run_runs(tmp_path, traces, start, traced):
    step_profiler = profiler.StepProfiler((3, 5), tmp_path, start=start)
    assert run_steps(step_profiler, start + 1, 8) == traced
    assert traces == ["start", "stop"]


def test_a_run_resumed_inside_the_range_says_what_it_traces(tmp_path, traces, caplog):
    with caplog.at_level(logging.WARNING):
        profiler.StepProfiler((3, 5), tmp_path, start=3)
    assert "resumes after step 3 and traces steps 4 to 5" in caplog.text


def test_a_run_resumed_past_the_range_warns_and_traces_nothing(tmp_path, traces, caplog):
    with caplog.at_level(logging.WARNING):
        step_profiler = profiler.StepProfiler((3, 5), tmp_path, start=5)
    assert "config.train.profile_steps=3,5: the run resumes after step 5" in caplog.text
    assert "no profile is written" in caplog.text
    assert run_steps(step_profiler, 6, 8) == []
    assert traces == []


@pytest.mark.parametrize("count, index, expected", [(1, 0, "profile"), (2, 1, "profile/process_1")])
def test_each_of_several_processes_traces_into_its_own_directory(
    tmp_path, monkeypatch, count, index, expected
):
    # Traces are named by host and second: two processes of a host must not share a directory.
    directories = []

    def start_trace(directory, **options):
        directories.append(directory)

    def stop_trace():
        pass

    def process_count():
        return count

    def process_index():
        return index

    monkeypatch.setattr(profiler.jax.profiler, "start_trace", start_trace)
    monkeypatch.setattr(profiler.jax.profiler, "stop_trace", stop_trace)
    monkeypatch.setattr(profiler.jax, "process_count", process_count)
    monkeypatch.setattr(profiler.jax, "process_index", process_index)
    run_steps(profiler.StepProfiler((1, 1), tmp_path, start=0), 1, 1)
    assert directories == [str(tmp_path / expected)]


@pytest.mark.parametrize("failing, traced", [("start_trace", []), ("stop_trace", [3, 4, 5])])
def test_a_trace_that_fails_costs_the_profile_not_the_run(
    tmp_path, traces, monkeypatch, caplog, failing, traced
):
    # A full disk, or a trace the user already runs, ended the run at its profiled steps.
    def fail(*args, **options):
        raise RuntimeError("no space left on device")

    monkeypatch.setattr(profiler.jax.profiler, failing, fail)
    step_profiler = profiler.StepProfiler((3, 5), tmp_path, start=0)
    with caplog.at_level(logging.WARNING):
        assert run_steps(step_profiler, 1, 8) == traced
    verb = "start" if failing == "start_trace" else "write"
    assert f"could not {verb} the trace in {tmp_path / 'profile'}" in caplog.text
    assert "no space left on device" in caplog.text
    assert caplog.text.count("could not") == 1  # tried once, not at every later step
    assert not step_profiler.active
