"""The batch iterators: packing, independence from the process count, resume, workers."""

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dga_jax.data.pipeline import DataConfig, make_eval_iterator, make_train_iterator
from dga_jax.data.slimpajama import ReadStats, iter_raw_records, list_shards, parse_record
from dga_jax.data.tokenizers import load_tokenizer
from dga_jax.data.workers import PARENT_POLL_S
from dga_jax.errors import ConfigError, InputError, MissingInputError
from tests.data.conftest import train_hf_tokenizer, write_jsonl_zst

ROOT = Path(__file__).parents[2]
# 4 rows of 33 tokens: every row stream runs past its first epoch within ~50 steps.
STEPS_PAST_AN_EPOCH = 60


@pytest.fixture
def config(corpus) -> DataConfig:
    return DataConfig(
        seq_len=32,
        global_batch_size=4,
        train=str(corpus / "train"),
        validation=str(corpus / "train" / "chunk1"),
        eval_batches=3,
    )


def take(iterator, steps: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(steps)]


def train_iterators(config: DataConfig, process_count: int):
    return [
        make_train_iterator(config, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]


def global_batches(iterators, steps: int) -> list[np.ndarray]:
    """Per step, the processes' inputs and last targets concatenated: [global_batch, seq+1]."""
    per_process = [take(it, steps) for it in iterators]
    return [
        np.concatenate([windows(batches[step]) for batches in per_process]) for step in range(steps)
    ]


def windows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The packed rows of seq_len + 1 tokens a batch was cut from."""
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def reference_row_stream(config: DataConfig, row: int, length: int) -> list[int]:
    """The first `length` tokens of row `row` written from its definition: records g with
    g % rows == row, numbered on across epochs in sorted file order, each as
    [BOS] + ids + [EOS]."""
    tok = load_tokenizer(config.tokenizer)
    bos, eos = [tok.bos_id] * config.add_bos, [tok.eos_id] * config.add_eos
    stream, index = [], 0
    while len(stream) < length:
        for path in list_shards(config.train):
            for raw in iter_raw_records(path):
                record = parse_record(raw, stats=ReadStats())
                if index % config.global_batch_size == row and record is not None:
                    stream += bos + tok.encode(record["text"]) + eos
                index += 1
    return stream[:length]


@pytest.mark.parametrize(
    "tokenizer, add_bos, add_eos",
    [
        ("byte", True, True),
        ("byte", False, True),
        ("byte", True, False),
        ("spm", True, True),
        ("hf", True, True),
    ],
)
def test_rows_are_the_packed_document_streams(
    config, tokenizer, add_bos, add_eos, spm_model, hf_tokenizer_json
):
    tokenizer = {"byte": "byte", "spm": str(spm_model), "hf": str(hf_tokenizer_json)}[tokenizer]
    config = dataclasses.replace(
        config, tokenizer=tokenizer, add_bos=add_bos, add_eos=add_eos, shuffle_shards=False
    )
    (it,) = train_iterators(config, 1)
    steps = STEPS_PAST_AN_EPOCH
    rows = np.stack(global_batches([it], steps), axis=1)  # [rows, steps, seq_len + 1]
    assert all(state["cursor"]["epoch"] >= 1 for state in it.get_state()["rows"].values())
    for row in range(config.global_batch_size):
        expected = reference_row_stream(config, row, steps * (config.seq_len + 1))
        np.testing.assert_array_equal(rows[row].reshape(-1), expected)


def test_global_batches_do_not_depend_on_the_process_count(config):
    steps = STEPS_PAST_AN_EPOCH
    reference = global_batches(train_iterators(config, 1), steps)
    for process_count in (2, 4):
        assert_same(global_batches(train_iterators(config, process_count), steps), reference)


def test_read_stats_split_over_processes(config):
    (single,) = train_iterators(config, 1)
    pair = train_iterators(config, 2)
    global_batches([single], STEPS_PAST_AN_EPOCH)
    global_batches(pair, STEPS_PAST_AN_EPOCH)
    assert pair[0].stats + pair[1].stats == single.stats
    # Past epoch 0, every bad record of the corpus has been met at least once.
    stats = single.stats
    assert stats.malformed >= 1 and stats.no_text >= 2 and stats.corrupt_shards >= 1
    assert stats.documents >= 60 - 15


@pytest.mark.parametrize("first", [0, 7, STEPS_PAST_AN_EPOCH])
def test_resume_reproduces_the_uninterrupted_run(config, first):
    it = make_train_iterator(config, process_index=0, process_count=2)
    take(it, first)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 15)
    if first == STEPS_PAST_AN_EPOCH:
        assert min(s["cursor"]["epoch"] for s in state["rows"].values()) >= 1
    resumed = make_train_iterator(config, process_index=0, process_count=2)
    resumed.set_state(state)
    assert_same(take(resumed, 15), expected)
    assert resumed.get_state() == it.get_state()
    assert resumed.stats == it.stats


def test_a_resume_over_other_shard_files_is_refused(config, corpus, tmp_path):
    # A saved position indexes the shard list: with shards added or removed it resumed from
    # other records, silently.
    it = make_train_iterator(config, process_index=0, process_count=1)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    fewer = dataclasses.replace(config, train=str(corpus / "train" / "chunk1"))
    with pytest.raises(InputError, match=r"config.data.train: the shard files changed .* \(4 "):
        make_train_iterator(fewer, process_index=0, process_count=1).set_state(state)
    moved = shutil.copytree(corpus / "train", tmp_path / "elsewhere")  # the same set, moved
    resumed = make_train_iterator(dataclasses.replace(config, train=str(moved)))
    resumed.set_state(state)
    assert_same(take(resumed, 2), take(it, 2))
    other = shutil.copytree(corpus / "train", tmp_path / "other")  # the same names, not data
    (other / "chunk1" / "example_train_0.jsonl.zst").write_bytes(b"")
    with pytest.raises(InputError, match=r"the shard files changed .* or other names or sizes"):
        make_train_iterator(dataclasses.replace(config, train=str(other))).set_state(state)
    del state["shards"]["sizes_sha256"]  # a state saved before sizes were fingerprinted
    make_train_iterator(dataclasses.replace(config, train=str(moved))).set_state(state)
    del state["shards"]  # a state saved before shards were fingerprinted
    make_train_iterator(fewer, process_index=0, process_count=1).set_state(state)


def test_a_resume_with_another_shard_order_is_refused(config):
    # A saved position names a file by its place in the epoch's (seeded) order: with another
    # seed it resumed in other files, silently re-reading some and skipping others.
    it = make_train_iterator(config)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    for other in ({"seed": 1}, {"shuffle_shards": False}):
        with pytest.raises(InputError, match=r"config.data.train: .* saved with shuffle_shards"):
            make_train_iterator(dataclasses.replace(config, **other)).set_state(state)
    resumed = make_train_iterator(config)
    resumed.set_state(state)
    assert_same(take(resumed, 2), take(it, 2))
    del state["order"]  # a state saved before orders were recorded
    make_train_iterator(dataclasses.replace(config, seed=1)).set_state(state)


def test_workers_give_the_same_batches_and_states(config):
    steps = STEPS_PAST_AN_EPOCH
    (plain,) = train_iterators(config, 1)
    (pooled,) = train_iterators(dataclasses.replace(config, num_workers=2), 1)
    states = []
    try:
        for _ in range(steps):
            assert_same([next(pooled)], [next(plain)])
            assert pooled.get_state() == plain.get_state()
            states.append(plain.get_state())
        pooled.set_state(states[10])  # a state taken without workers restarts the workers
        (replay,) = train_iterators(config, 1)
        replay.set_state(states[10])
        assert_same(take(pooled, 5), take(replay, 5))
    finally:
        pooled.close()


def test_workers_outlive_stop_signals_sent_to_the_process_group(config, monkeypatch):
    # Ctrl-C, scancel and `timeout` signal the whole process group: Grain's workers died of
    # it (while starting, or running) and the run crashed instead of saving a checkpoint.
    started, start = [], multiprocessing.context.SpawnProcess.start

    def start_and_signal(process):
        start(process)
        started.append(process.pid)
        send_stop_signals(process.pid)  # the worker is still starting

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start_and_signal)
    (plain,) = train_iterators(config, 1)
    (pooled,) = train_iterators(dataclasses.replace(config, num_workers=2), 1)
    try:
        assert_same(take(pooled, 1), take(plain, 1))
        assert len(started) == 2
        for pid in started:
            send_stop_signals(pid)  # the worker is running
        assert_same(take(pooled, 10), take(plain, 10))
    finally:
        pooled.close()


ORPHAN = """
import multiprocessing, os, signal, sys
from absl import flags
from dga_jax.data.pipeline import DataConfig, make_train_iterator

if __name__ == "__main__":  # Grain's workers are spawned: they import this file
    flags.FLAGS.mark_as_parsed()
    config = DataConfig(32, 4, train=sys.argv[1], validation=sys.argv[1], num_workers=1)
    batches = make_train_iterator(config)  # held: a dropped iterator closes its workers
    next(batches)
    print(*(child.pid for child in multiprocessing.active_children()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer: the iterator is never closed
"""


def test_a_worker_whose_parent_died_ends_itself(corpus, tmp_path):
    # A worker never sees the stop signals: orphaned, it lived on, holding its memory, until
    # SIGKILL. It now checks its parent each second.
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    ran = subprocess.run(
        [sys.executable, str(script), str(corpus / "train")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert ran.returncode == -signal.SIGKILL, ran.stderr[-2000:]
    workers = [int(pid) for pid in ran.stdout.split()]
    assert len(workers) == 1, ran.stdout
    deadline = time.monotonic() + 10 * PARENT_POLL_S
    while alive(workers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(workers[0])


def alive(pid: int) -> bool:
    """Whether `pid` runs (an exited process its new parent has not reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def send_stop_signals(pid: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(pid, sig)


def test_eval_iterator_is_finite_deterministic_and_split(config):
    first = list(make_eval_iterator(config, process_index=0, process_count=1))
    again = list(make_eval_iterator(config, process_index=0, process_count=1))
    assert len(first) == config.eval_batches
    assert_same(again, first)
    halves = [list(make_eval_iterator(config, process_index=p, process_count=2)) for p in range(2)]
    for step, batch in enumerate(first):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][step]["inputs"], halves[1][step]["inputs"]]),
            batch["inputs"],
        )


def test_configuration_errors(config, corpus, tmp_path):
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_train_iterator(config, process_index=0, process_count=3)
    with pytest.raises(ConfigError, match=r"config\.data\.num_workers=3 must divide"):
        make_train_iterator(
            dataclasses.replace(config, num_workers=3), process_index=0, process_count=1
        )
    with pytest.raises(ConfigError, match=r"config\.data\.seq_len must be a positive int"):
        dataclasses.replace(config, seq_len=0)
    with pytest.raises(ConfigError, match=r"config\.data\.num_workers must be an int >= 0"):
        dataclasses.replace(config, num_workers=-1)
    with pytest.raises(ConfigError, match=r"config\.data\.set_names must be a sequence"):
        dataclasses.replace(config, set_names="RedPajamaC4")
    with pytest.raises(ValueError, match="bogus"):
        DataConfig.from_dict({"seq_len": 8, "global_batch_size": 2, "bogus": 1})
    no_specials = train_hf_tokenizer(tmp_path / "tokenizer.json", [])
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer .* has no BOS token"):
        make_train_iterator(
            dataclasses.replace(config, tokenizer=str(no_specials)),
            process_index=0,
            process_count=1,
        )
    it = make_train_iterator(config, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="same global_batch_size and process_count"):
        it.set_state(make_train_iterator(config, process_index=0, process_count=2).get_state())


@pytest.mark.parametrize("given", ["train", "validation"])
def test_one_split_without_the_other_is_a_config_error(corpus, given):
    # Only both unset means the sample corpus: one split alone must not read it for the other.
    paths = {given: str(corpus / "train")}
    with pytest.raises(ConfigError) as error:
        DataConfig(seq_len=8, global_batch_size=2, **paths)
    message = str(error.value)
    assert f"config.data.{given} is set but" in message
    assert "config.data.train" in message and "config.data.validation" in message


def test_a_filter_that_keeps_nothing_is_an_error_not_a_hang(config):
    strict = dataclasses.replace(config, set_names=("RedPajamaArXiv",))
    it = make_train_iterator(strict, process_index=0, process_count=1)
    with pytest.raises(InputError, match=r"config\.data\.train: .* no usable document"):
        next(it)


def test_data_errors_name_the_split_and_what_was_skipped(tmp_path):
    for split, count in (("train", 7), ("validation", 50)):
        write_jsonl_zst(tmp_path / split / "0.jsonl.zst", [{"meta": {}}] * count)
    config = DataConfig(
        seq_len=8,
        global_batch_size=2,
        train=str(tmp_path / "train"),
        validation=str(tmp_path / "validation"),
    )
    message = (
        r"'validation' split has no usable document \(its 50 records an epoch are 50 no_text\)"
    )
    with pytest.raises(InputError, match=r"config\.data\.validation: the " + message):
        next(make_eval_iterator(config))
    write_jsonl_zst(tmp_path / "empty" / "0.jsonl.zst", [b" "])  # a blank line is no record
    empty = dataclasses.replace(config, train=str(tmp_path / "empty"))
    with pytest.raises(MissingInputError, match=r"config\.data\.train: no records in any"):
        next(make_train_iterator(empty))


def assert_same(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        a, e = (windows(x) if isinstance(x, dict) else x for x in (a, e))
        np.testing.assert_array_equal(a, e)


def test_explicit_rows_are_those_rows_of_the_global_batch(config):
    # A process whose devices hold rows 1 and 3 (e.g. sequences sharded across hosts) loads
    # exactly those rows of the global batch, in order.
    full = take(make_train_iterator(config), 5)
    picked = take(make_train_iterator(config, rows=[1, 3]), 5)
    for whole, part in zip(full, picked, strict=True):
        np.testing.assert_array_equal(part["inputs"], whole["inputs"][[1, 3]])
        np.testing.assert_array_equal(part["targets"], whole["targets"][[1, 3]])
    with pytest.raises(ValueError, match="rows must be sorted"):
        make_train_iterator(config, rows=[3, 1])
    with pytest.raises(ValueError, match="rows must be sorted"):
        make_train_iterator(config, rows=[0, config.global_batch_size])


@pytest.mark.parametrize("process_count", [0, -2, True])
def test_a_process_count_that_is_not_positive_is_named(config, process_count):
    # 0 ended in a ZeroDivisionError from the row split.
    with pytest.raises(
        ValueError, match=rf"process_count must be a positive int, got {process_count}"
    ):
        make_train_iterator(config, process_index=0, process_count=process_count)


def test_a_batch_that_processes_cannot_share_is_a_config_error(config):
    with pytest.raises(ConfigError, match=r"config\.data\.global_batch_size=4 must be a multiple"):
        make_train_iterator(config, process_index=0, process_count=8)


@pytest.mark.parametrize("workers", [1.5, True, "2"])
def test_num_workers_that_is_not_an_int_is_a_config_error(config, workers):
    # They were taken as worker counts: 1.5 reached Grain where it divided the rows.
    with pytest.raises(ConfigError, match=r"config\.data\.num_workers must be an int >= 0"):
        dataclasses.replace(config, num_workers=workers)


@pytest.mark.parametrize("names", [("RedPajamaC4", 1), ("",), (None,)])
def test_set_names_that_are_not_names_are_a_config_error(config, names):
    # A number or "" never matches a record's set name: the filter kept nothing.
    with pytest.raises(ConfigError, match=r"config\.data\.set_names must hold non-empty strings"):
        dataclasses.replace(config, set_names=names)


def test_a_set_name_slimpajama_does_not_have_is_warned_about(config, caplog):
    # A misspelt filter keeps nothing, which shows only after an epoch of the whole split.
    with caplog.at_level(logging.WARNING):
        dataclasses.replace(config, set_names=("RedPajamaC4", "RedPajamaWikipedia"))
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        dataclasses.replace(config, set_names=("RedPajamaC4", "RedPajamaGitHub"))
    assert "['RedPajamaGitHub']: not SlimPajama set names" in caplog.text
    assert "RedPajamaGithub" in caplog.text
