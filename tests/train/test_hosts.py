"""Cross-host agreement helpers on one process, and the config's range checks."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from configs import tiny_dga
from dga_jax.errors import InputError
from train.config import ConfigError, from_config_dict
from train.hosts import StopSignal, all_rows_state, rows_state


def test_data_state_round_trip_selects_this_process_rows():
    state = {"step": 4, "rows": {str(r): {"cursor": r} for r in range(4)}}
    assert all_rows_state(state) == state  # one process: nothing to gather
    mine = rows_state(state, [1, 3])
    assert mine == {"step": 4, "rows": {"1": {"cursor": 1}, "3": {"cursor": 3}}}
    with pytest.raises(ValueError, match=r"no rows \[5\]"):
        rows_state(state, [1, 5])


@pytest.mark.parametrize(
    "state, message",
    [
        ({"step": 4, "rows": {"0": {}}}, r"has no rows \[1\]"),
        ({"step": 4}, r"not a data iterator's \(no rows\)"),
    ],
)
def test_a_data_state_without_this_process_rows_is_an_input_error(state, message):
    # A ValueError (or a KeyError) that left the entry point with a traceback.
    with pytest.raises(InputError, match=message):
        rows_state(state, [0, 1])


def test_stop_signal_is_recorded_then_default_again():
    stop = StopSignal()
    try:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed() and stop.received == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is not stop._handle  # a second one kills
    finally:
        stop.restore()


def test_stop_signal_off_the_main_thread_warns_and_leaves_signals_alone(caplog):
    # signal.signal's ValueError ("only works in main thread") ended a run started in a thread.
    made, before = [], signal.getsignal(signal.SIGTERM)

    def make():
        made.append(StopSignal())

    with caplog.at_level(logging.WARNING):
        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
    assert len(made) == 1 and not made[0].agreed()
    made[0].restore()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "training off the main thread" in caplog.text


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "steps", 0),
        ("train", "grad_accum_steps", 0),
        ("train", "log_every", 0),
        ("train", "eval_every", 0),
        ("optim", "max_nonfinite_steps", 0),
    ],
)
def test_non_positive_counts_are_rejected_by_name(section, key, value):
    config = tiny_dga.get_config().to_dict()
    config[section][key] = value
    with pytest.raises(ConfigError, match=rf"config\.{section}\.{key} must be >= 1"):
        from_config_dict(config)
