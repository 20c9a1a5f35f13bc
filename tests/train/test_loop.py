"""The training loop end to end on the embedded default, shortened: learning, export,
divergence. Kills, signals, damage and resumes are in test_faults.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny_dga
from dga_jax import Llama
from dga_jax.checkpoint import load_model
from dga_jax.data.tokenizers import ByteTokenizer
from dga_jax.errors import InputError
from train.config import from_config_dict
from train.loop import run
from train.step import TrainState
from train.trainer import NonFiniteError, Trainer, applied_learning_rate

ROOT = Path(__file__).parents[2]


def tiny(**train) -> object:
    config = tiny_dga.get_config()
    config.data.seq_len = 128
    for key, value in {
        "steps": 12,
        "log_every": 1,
        "eval_every": 1000,
        "eval_batches": 2,
        "checkpoint_every": 1000,
        **train,
    }.items():
        config.train[key] = value
    return config


def read(workdir: Path, key: str) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def test_validation_loss_falls(tmp_path, caplog):
    config = tiny(steps=40, eval_every=20, log_every=10, profile_steps="2,3")
    summary = run(from_config_dict(config), tmp_path)
    # A trace of steps 2-3 for TensorBoard (xplane) and Perfetto.
    traces = [p.name for p in (tmp_path / "profile").rglob("*") if p.is_file()]
    assert any(name.endswith(".xplane.pb") for name in traces), traces
    assert "perfetto_trace.json.gz" in traces, traces
    val = read(tmp_path, "val_loss")
    assert sorted(val) == [20, 40]
    assert val[40] < val[20] - 0.3, val
    assert val[40] < np.log(259) - 1.5, val  # far below a uniform guess over the byte vocab
    assert summary.step == 40 and summary.val_loss == val[40]
    assert (tmp_path / "loss.png").stat().st_size > 0
    # The trained model is exported where load_model and `python -m dga_jax.generate` read it.
    train_config = from_config_dict(config)
    model = load_model(tmp_path / "model" / "40")
    assert model.config == train_config.model
    initial = Llama(train_config.model, rngs=nnx.Rngs(train_config.train.seed))
    text = jnp.asarray([ByteTokenizer().encode("def main():\n    return 0\n" * 4)])
    assert next_token_loss(model, text) < next_token_loss(initial, text) - 1.0

    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in (
        "loss",
        "perplexity",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "step_time_s",
        "nonfinite_steps",
        "skipped_records",
    ):
        assert key in record, key

    # Started again, the finished run runs no step and reports its last logged losses.
    with caplog.at_level(logging.WARNING):
        again = run(train_config, tmp_path)
    assert (again.step, again.train_loss, again.val_loss) == (40, summary.train_loss, val[40])
    assert f"the run in {tmp_path} already finished at step 40" in caplog.text
    assert "profile_steps=2,3: the run resumes after step 40" in caplog.text
    assert read(tmp_path, "val_loss") == val


def next_token_loss(model, tokens) -> float:
    logits = model(tokens[:, :-1])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean())


def test_divergence_stops_with_a_clear_message(tmp_path):
    config = tiny(steps=12)
    config.optim.learning_rate = 1e30
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 1e30
    config.optim.max_nonfinite_steps = 2
    with pytest.raises(NonFiniteError, match=r"config\.optim\.max_nonfinite_steps=2"):
        run(from_config_dict(config), tmp_path)


def test_main_job_command_is_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    assert "-m train --config=configs/tiny_dga.py" in makefile
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


class FakeData:
    """A train iterator that yields nothing the fake step reads; its state is a step count."""

    stats = None

    def __init__(self):
        self.step = 0

    def __next__(self):
        self.step += 1
        return {}

    def get_state(self):
        return {"step": self.step, "rows": {}}

    def close(self):
        pass


class FakeCheckpoints:
    """Records the steps saved (every `every` steps, or forced) and their run records."""

    def __init__(self, every: int):
        self.every, self.saved, self.records = every, [], {}

    def save(self, step, state, data_state, record, *, force):
        if (force or step % self.every == 0) and step not in self.saved:
            data_state()
            self.saved.append(step)
            self.records[step] = record

    def close(self):
        pass


def fake_step(state, batch):
    """Loss 10 x the step being run: each logged loss tells which steps it averages."""
    loss = 10.0 * (state.step + 1)
    return dataclasses.replace(state, step=state.step + 1), {"loss": loss, "grad_norm": loss}


def fake_trainer(workdir: Path, **train) -> Trainer:
    """A Trainer over `tiny(**train)` whose jitted step, batches and checkpoints are stand-ins."""
    config = from_config_dict(tiny(**train))
    setup = types.SimpleNamespace(graphdef=None, tx=None, shardings=None, loss_chunks=1)
    checkpoints = FakeCheckpoints(config.train.checkpoint_every)
    trainer = Trainer(config, setup, FakeData(), checkpoints, None, workdir, start=0)
    trainer.step_fn = fake_step
    trainer._batch = dict
    return trainer


def zero_state() -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, {}, {}, zero, zero)


def test_a_stop_between_logs_logs_the_steps_since_the_last(tmp_path):
    trainer = fake_trainer(tmp_path, steps=12, log_every=4)
    state = zero_state()
    try:
        for done in range(1, 7):
            if done == 6:
                trainer.stop.received = "SIGTERM"  # as the handler records it
            state = trainer.step(state, done)
    finally:
        trainer.close()
    assert trainer.stopping and trainer.checkpoints.saved == [6]
    assert read(tmp_path, "loss") == {4: 25.0, 6: 55.0}  # steps 1-4, then 5-6


def test_the_data_state_is_read_only_for_a_checkpoint(tmp_path):
    # It was gathered from every process at every step (two allgathers and a JSON round trip
    # between hosts per step), then dropped unless a checkpoint was due.
    trainer = fake_trainer(tmp_path, steps=12, checkpoint_every=3, eval_every=100)
    reads, get_state = [], trainer.train_iter.get_state
    trainer.train_iter.get_state = lambda: reads.append(trainer.train_iter.step) or get_state()
    state = zero_state()
    try:
        for done in range(1, 8):
            state = trainer.step(state, done)
    finally:
        trainer.close()
    assert trainer.checkpoints.saved == [3, 6] and reads == [3, 6]


def test_a_failed_evaluation_still_saves_the_checkpoint_due_owing_it(tmp_path):
    # The run died in the evaluation before the checkpoint due at its step: those steps lost.
    trainer = fake_trainer(tmp_path, steps=12, eval_every=4, checkpoint_every=4)

    def unreadable_validation(done, state):
        raise InputError("config.data.validation: unreadable")

    trainer.evaluate = unreadable_validation
    state = zero_state()
    try:
        with pytest.raises(InputError, match="unreadable"):
            for done in range(1, 5):
                state = trainer.step(state, done)
    finally:
        trainer.close()
    assert trainer.checkpoints.saved == [4]
    assert trainer.checkpoints.records[4]["eval_owed"] is True


def skipping_step(skipped: set[int]):
    """`fake_step`, with the steps in `skipped` non-finite (NaN loss, update skipped)."""

    def step(state, batch):
        state, out = fake_step(state, batch)
        bad = int(state.step) in skipped
        streak = state.nonfinite_streak + 1 if bad else jnp.zeros((), jnp.int32)
        state = dataclasses.replace(
            state, nonfinite_streak=streak, nonfinite_total=state.nonfinite_total + bad
        )
        return state, {**out, "loss": np.nan if bad else out["loss"]}

    return step


def test_a_skipped_step_does_not_hide_the_losses_logged_with_it(tmp_path):
    # The logged loss was NaN for the whole window, and so the run's summary.
    trainer = fake_trainer(tmp_path, steps=12, log_every=4)
    trainer.step_fn = skipping_step({2})
    state = zero_state()
    try:
        for done in range(1, 5):
            state = trainer.step(state, done)
    finally:
        trainer.close()
    assert read(tmp_path, "loss") == {4: pytest.approx((10 + 30 + 40) / 3)}
    assert read(tmp_path, "nonfinite_steps") == {4: 1}
    assert trainer.summary(state).train_loss == pytest.approx((10 + 30 + 40) / 3)


def test_a_divergence_logs_its_steps_before_it_stops(tmp_path):
    # The steps since the last log, the divergence among them, were never logged.
    trainer = fake_trainer(tmp_path, steps=20, log_every=20)
    limit = trainer.config.optim.max_nonfinite_steps
    last = 2 + limit  # steps 3 to `last` skipped
    trainer.step_fn = skipping_step(set(range(3, last + 1)))
    state = zero_state()
    try:
        with pytest.raises(NonFiniteError, match=f"at step {last}"):
            for done in range(1, 20):
                state = trainer.step(state, done)
    finally:
        trainer.close()
    assert read(tmp_path, "nonfinite_steps") == {last: limit}
    assert read(tmp_path, "loss") == {last: pytest.approx(15.0)}  # steps 1 and 2


def test_close_releases_everything_even_when_a_release_fails(caplog):
    # The profiler's or the input pipeline's failure skipped the wait for the checkpoint save.
    released = []

    def release(name, error=None):
        def close():
            released.append(name)
            if error:
                raise error

        return types.SimpleNamespace(close=close, restore=close)

    trainer = types.SimpleNamespace(
        profiler=release("profiler", RuntimeError("stop_trace failed")),
        progress=release("progress"),
        train_iter=release("train_iter", OSError("pipeline worker died")),
        log=release("log"),
        stop=release("stop"),
        checkpoints=release("checkpoints"),
    )
    with pytest.raises(OSError, match="pipeline worker died"), caplog.at_level(logging.ERROR):
        Trainer.close(trainer)
    assert released == ["profiler", "progress", "train_iter", "log", "stop", "checkpoints"]
    assert "closing the run: RuntimeError: stop_trace failed" in caplog.text


def test_the_logged_learning_rate_is_the_last_applied_updates():
    # A skipped (non-finite) step leaves the optimizer's schedule count behind the step count:
    # the log read schedule(step - 1), k steps ahead after k skips.
    schedule = optax.linear_schedule(0.0, 1.0, 10)
    state = types.SimpleNamespace(nonfinite_total=np.int32(2))
    assert applied_learning_rate(schedule, 6, state) == pytest.approx(0.3)  # 4 updates applied
    state.nonfinite_total = np.int32(0)
    assert applied_learning_rate(schedule, 6, state) == pytest.approx(0.5)


def test_a_workdir_that_is_a_file_is_an_input_error(tmp_path):
    # It ended in mkdir's FileExistsError traceback after the setup.
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(InputError, match=r"the workdir .*run is a file"):
        run(from_config_dict(tiny(steps=1)), tmp_path / "run")
    with pytest.raises(InputError, match=r"cannot make the workdir .*run/inner"):
        run(from_config_dict(tiny(steps=1)), tmp_path / "run" / "inner")


def test_a_failed_start_releases_the_pipeline_checkpoints_and_signals(tmp_path, monkeypatch):
    # A bad metrics file (or a refused resume) raised after Grain's workers and Orbax's
    # manager had started, and left them running, with the run's signal handlers, in the
    # process that goes on (a notebook).
    import signal

    import train.loop as loop

    closed = []
    make_iterator = loop.pipeline.make_train_iterator

    def recorded(*args, **kwargs):
        it = make_iterator(*args, **kwargs)
        close = it.close
        it.close = lambda: (closed.append("train_iter"), close())[1]
        return it

    monkeypatch.setattr(loop.pipeline, "make_train_iterator", recorded)
    close_checkpoints = loop.Checkpoints.close
    monkeypatch.setattr(
        loop.Checkpoints, "close", lambda self: (closed.append("ckpt"), close_checkpoints(self))[1]
    )
    (tmp_path / "metrics.jsonl").write_text("epoch,loss\n1,2.5\n")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(InputError, match="not a metrics record"):
        run(from_config_dict(tiny(steps=1)), tmp_path)
    assert closed == ["train_iter", "ckpt"]
    assert signal.getsignal(signal.SIGTERM) is before
