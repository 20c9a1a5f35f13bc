"""Metrics: JSONL that reads as one run across resumes, optional W&B, the MFU peak lookup."""

from __future__ import annotations

import json
import logging
import math
import sys
import types

import pytest

from dga_jax.errors import InputError
from train import metrics


def test_resume_drops_records_after_the_restored_step(tmp_path):
    log = metrics.MetricsLog(tmp_path, resume_step=0)
    for step in range(1, 6):
        log.write(step, {"loss": float(step)})
    log.close()
    resumed = metrics.MetricsLog(tmp_path, resume_step=3)
    resumed.write(4, {"loss": 40.0})
    resumed.close()
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_an_owed_evaluation_run_by_two_reruns_is_logged_once(tmp_path):
    # Stopped in step 2's evaluation (checkpoint 2 owes it); a rerun logged it and died before
    # checkpoint 4; the next rerun logged it again: two val_loss records of step 2.
    log = metrics.MetricsLog(tmp_path, resume_step=0)
    for step in (1, 2):
        log.write(step, {"loss": float(step)})
    log.close()
    for val_loss in (0.5, 0.25):
        log = metrics.MetricsLog(tmp_path, resume_step=2, eval_owed=True)
        log.write(2, {"val_loss": val_loss, "val_perplexity": math.exp(val_loss)})
        log.write(3, {"loss": 3.0})
        log.close()
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["val_loss"]) for r in records if "val_loss" in r] == [(2, 0.25)]
    assert [(r["step"], r["loss"]) for r in records if "loss" in r] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
    ]


def tensorboard_events(directory) -> list:
    """Every event of the TensorBoard files in `directory` (TFRecords: length, its CRC, the
    event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + 8], "little")
            events.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_resume_purges_tensorboard_events_after_the_restored_step(tmp_path):
    log = metrics.MetricsLog(tmp_path, resume_step=0)
    for step in (1, 2, 3):
        log.write(step, {"loss": 1.0})
    log.close()
    log = metrics.MetricsLog(tmp_path, resume_step=1)
    log.write(2, {"loss": 0.5})
    log.close()
    events = tensorboard_events(tmp_path / "tensorboard")
    # TensorBoard drops the events of steps >= 2 written before this marker.
    assert [e.step for e in events if e.session_log.status] == [2]


def test_a_fresh_start_hides_every_earlier_tensorboard_event(tmp_path):
    # A run killed before its first checkpoint, rerun: metrics.jsonl started over, and
    # TensorBoard still showed the old run's curve.
    log = metrics.MetricsLog(tmp_path, resume_step=0)
    log.write(1, {"loss": 5.0})
    log.close()
    (old,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    old.rename(old.with_name("events.out.tfevents.0000000001.earlier"))  # an older run's file
    log = metrics.MetricsLog(tmp_path, resume_step=0)
    log.write(1, {"loss": 4.0})
    log.close()
    assert shown_scalars(tensorboard_events(tmp_path / "tensorboard")) == [(1, 4.0)]


def shown_scalars(events) -> list[tuple[int, float]]:
    """(step, value) of the scalar events TensorBoard shows: a session start at step T hides the
    events before it of steps >= T."""
    shown = []
    for event in events:
        if event.session_log.status:
            shown = [(step, value) for step, value in shown if step < event.step]
        elif event.summary.value:
            shown.append((event.step, event.summary.value[0].simple_value))
    return shown


def test_a_line_cut_short_at_the_end_is_dropped_with_a_warning(tmp_path, caplog):
    log = metrics.MetricsLog(tmp_path, resume_step=0)
    log.write(1, {"loss": 1.0})
    log.write(1, {"val_loss": 1.5})
    log.close()
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 2, "loss": 2.')  # a run killed while appending
    with caplog.at_level(logging.WARNING):
        resumed = metrics.MetricsLog(tmp_path, resume_step=2)
    assert f"{path}: line 3 cut short" in caplog.text
    assert resumed.last == {"loss": 1.0, "val_loss": 1.5}
    resumed.write(2, {"loss": 2.0})
    resumed.close()
    records = metrics.read_metrics(path)
    assert records == [
        {"step": 1, "loss": 1.0},
        {"step": 1, "val_loss": 1.5},
        {"step": 2, "loss": 2.0},
    ]


def test_an_unreadable_line_before_readable_ones_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 3.0}\n')
    with pytest.raises(InputError, match=r"metrics\.jsonl line 2 is not a metrics record"):
        metrics.MetricsLog(tmp_path, resume_step=3)
    assert path.read_text().count("\n") == 3  # left as it was, for the user to repair


def test_a_file_that_is_not_a_runs_metrics_is_named_and_kept(tmp_path):
    # Every line was taken for one cut short: dropped, and the file rewritten empty.
    path = tmp_path / "metrics.jsonl"
    path.write_text("epoch,loss\n1,2.5\n")
    with pytest.raises(InputError, match=r"metrics\.jsonl line 1 is not a metrics record"):
        metrics.MetricsLog(tmp_path, resume_step=5)
    assert path.read_text() == "epoch,loss\n1,2.5\n"


def test_only_an_unterminated_last_line_counts_as_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n')  # a whole line, unreadable
    with pytest.raises(InputError, match=r"metrics\.jsonl line 2 is not a metrics record"):
        metrics.read_metrics(path)


def test_a_damaged_file_stops_the_run_before_wandb_starts(tmp_path, monkeypatch):
    # The W&B run was started first, and never finished.
    started = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=started.append))
    (tmp_path / "metrics.jsonl").write_text("not a record\n")
    with pytest.raises(InputError, match="line 1 is not a metrics record"):
        metrics.MetricsLog(tmp_path, resume_step=1, wandb_project="dga")
    assert started == []


def test_a_metrics_path_that_cannot_be_read_is_an_input_error(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # was IsADirectoryError's traceback
    with pytest.raises(InputError, match=r"cannot read the metrics file .*metrics\.jsonl"):
        metrics.MetricsLog(tmp_path, resume_step=1)


def test_wandb_receives_finite_scalars(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs["project"], kwargs["config"]))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    log = metrics.MetricsLog(tmp_path, resume_step=0, wandb_project="dga", run_config={"lr": 1e-3})
    log.write(7, {"loss": 2.5, "val_loss": float("nan"), "note": "x"})
    log.close()
    assert calls == [("init", "dga", {"lr": 1e-3}), ("log", {"loss": 2.5}, 7), ("finish",)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5


def test_missing_wandb_warns_and_keeps_logging(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with caplog.at_level(logging.WARNING):
        log = metrics.MetricsLog(tmp_path, resume_step=0, wandb_project="dga")
    assert "wandb is not installed" in caplog.text
    log.write(1, {"loss": 1.0})
    log.close()
    assert metrics.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


def test_peak_flops():
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3", 0.0) == 989e12
    assert metrics.peak_flops("cpu", 0.0) is None
    assert metrics.peak_flops("cpu", 1e11) == 1e11


def test_peak_flops_takes_the_most_specific_device_kind():
    assert metrics.peak_flops("TPU v5 lite", 0.0) == 197e12  # not TPU v5(p)'s 459e12
    assert metrics.peak_flops("TPU v5", 0.0) == 459e12
    assert metrics.peak_flops("TPU v6 lite", 0.0) == 918e12


def strict_json(line: str) -> dict:
    """`line` read as strict JSON: NaN and Infinity, which jq and JavaScript reject, raise."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_written_as_strict_json_and_read_back(tmp_path):
    # NaN and Infinity were written as such: not JSON to jq, JavaScript or a strict parser.
    log = metrics.MetricsLog(tmp_path, resume_step=0)
    log.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "tokens_per_s": 5.0})
    log.write(2, {"val_loss": float("-inf")})
    log.close()
    path = tmp_path / "metrics.jsonl"
    assert [strict_json(line) for line in path.read_text().splitlines()] == [
        {
            "step": 1,
            "loss": None,
            "grad_norm": None,
            "tokens_per_s": 5.0,
            "nonfinite": {"loss": "nan", "grad_norm": "inf"},
        },
        {"step": 2, "val_loss": None, "nonfinite": {"val_loss": "-inf"}},
    ]
    first, second = metrics.read_metrics(path)
    assert math.isnan(first["loss"]) and first["grad_norm"] == math.inf
    assert second == {"step": 2, "val_loss": -math.inf}
    resumed = metrics.MetricsLog(tmp_path, resume_step=2)  # rewrites the file: strict again
    resumed.close()
    assert math.isnan(resumed.last["loss"]) and resumed.last["val_loss"] == -math.inf
    assert [strict_json(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "nonfinite", ['{"loss": "oops"}', '{"loss": "1.5"}', '["loss"]', '{"loss": 7}']
)
def test_a_damaged_nonfinite_is_a_damaged_line(tmp_path, nonfinite):
    # float("oops") raised a bare ValueError on resume, past the message naming the line.
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1, "loss": null, "nonfinite": {nonfinite}}}\n{{"step": 2}}\n')
    with pytest.raises(InputError, match=r"metrics\.jsonl line 1 is not a metrics record"):
        metrics.read_metrics(path)
