"""The global record order, and row streams: dealing, bounded queues, the guard and resume."""

import dataclasses
import itertools
import json
import random

import pytest

from dga_jax.data import packing
from dga_jax.data.packing import (
    Cursor,
    RowStreams,
    StreamSpec,
    file_order,
    initial_row_state,
    scan,
)
from dga_jax.data.pipeline import DataConfig, make_eval_iterator
from dga_jax.data.slimpajama import iter_raw_records, list_shards
from dga_jax.errors import InputError
from tests.data.conftest import WORDS, record, write_jsonl_zst

BOS, EOS = 1, 2  # of the byte tokenizer, whose id of byte b is 3 + b
# Records all scans of one test may read: far more than any test here needs, far fewer than a
# scan that runs away (the failure this file guards against) would read before filling memory.
RECORD_BUDGET = 20_000


def spec_of(files, **changes) -> StreamSpec:
    fields = {"tokenizer": "byte", "seq_len": 8, "num_rows": 2, "split": "train"} | changes
    return StreamSpec(files=tuple(files), **fields)


@pytest.fixture
def record_budget(monkeypatch):
    """Makes every scan of `packing` fail once they have read `RECORD_BUDGET` records in all."""
    counter = itertools.count()

    def budgeted_scan(spec, start):
        for item in scan(spec, start):
            if next(counter) >= RECORD_BUDGET:
                raise RuntimeError(f"the scans read over {RECORD_BUDGET} records")
            yield item

    monkeypatch.setattr(packing, "scan", budgeted_scan)


def packed(text: str) -> list[int]:
    return [BOS, *(3 + b for b in text.encode()), EOS]


def take_windows(streams: RowStreams, rows, steps: int) -> tuple[dict[int, list], int]:
    """`steps` windows of each row, rows in turn; and the most bytes a queue held meanwhile."""
    windows, fullest = {row: [] for row in rows}, 0
    for _ in range(steps):
        for row in rows:
            windows[row].append(streams.next_window(row).tolist())
            fullest = max([fullest, *(streams._rows[r].queued_bytes for r in rows)])
    return windows, fullest


def largest_record(spec: StreamSpec) -> int:
    return max(packing._size(raw) for file in spec.files for raw in iter_raw_records(file))


def alone(spec: StreamSpec, row: int, steps: int, state=None) -> list:
    """The first `steps` windows of `row` (from `state`) read by a `RowStreams` of it alone."""
    streams = RowStreams(spec, {row: state or initial_row_state()})
    return take_windows(streams, [row], steps)[0][row]


def test_file_order_is_a_seeded_permutation_per_epoch():
    files = [f"shard_{i:02d}.jsonl.zst" for i in range(12)]
    assert file_order(spec_of(files), 5) == tuple(files)
    shuffled = spec_of(files, shuffle_files=True, seed=3)
    orders = [file_order(shuffled, epoch) for epoch in range(3)]
    assert all(sorted(order) == files for order in orders)
    assert len(set(orders)) == 3
    assert orders[1] == file_order(spec_of(files, shuffle_files=True, seed=3), 1)
    assert orders[1] != file_order(spec_of(files, shuffle_files=True, seed=4), 1)


def test_scan_restarts_from_any_cursor(corpus):
    spec = spec_of(list_shards(str(corpus / "train")), shuffle_files=True)
    items = list(itertools.islice(scan(spec, Cursor()), 200))  # more than two epochs
    assert [c.epoch for c, _ in items][-1] >= 2
    for position in (1, 17, 40, 95, 150):
        cursor = items[position][0]
        resumed = list(itertools.islice(scan(spec, cursor), 200 - position))
        assert resumed == items[position:]


def test_record_numbers_run_on_across_epochs(corpus):
    spec = spec_of(list_shards(str(corpus / "train")), shuffle_files=True)
    cursors = [c for c, _ in itertools.islice(scan(spec, Cursor()), 200)]
    assert [c.record for c in cursors] == list(range(200))
    per_epoch = sum(c.epoch == 0 for c in cursors)
    assert all(c.record // per_epoch == c.epoch for c in cursors)


TEXTS = ("alpha", "bravo two", "charlie three 3")


@pytest.fixture
def three_documents(tmp_path) -> str:
    return str(write_jsonl_zst(tmp_path / "three.jsonl.zst", [record(t) for t in TEXTS]))


def test_rows_take_the_documents_in_turn_when_they_are_fewer_than_rows(
    three_documents, record_budget
):
    spec = spec_of([three_documents], seq_len=5, num_rows=8)
    streams = RowStreams(spec, {row: initial_row_state() for row in range(8)}, queue_bytes=2)
    windows, fullest = take_windows(streams, range(8), 6)
    assert fullest < 2 + largest_record(spec)  # below the limit, plus the record that filled it
    for row in range(8):
        # Row `row` gets records row, row + 8, row + 16, ...: record g is document g % 3.
        stream = sum((packed(TEXTS[(row + 8 * k) % 3]) for k in range(12)), [])
        assert sum(windows[row], []) == stream[: 6 * 6]


def test_a_validation_split_smaller_than_a_batch_evaluates(tmp_path, record_budget):
    rng = random.Random(1)
    docs = [record(" ".join(rng.choices(WORDS, k=rng.randint(1, 6)))) for _ in range(6)]
    validation = str(write_jsonl_zst(tmp_path / "validation/val.jsonl.zst", docs))
    config = DataConfig(
        seq_len=16, global_batch_size=8, train=validation, validation=validation, eval_batches=5
    )
    batches = list(make_eval_iterator(config, process_index=0, process_count=1))
    assert len(batches) == 5
    assert all(batch["inputs"].shape == (8, 16) for batch in batches)


@pytest.fixture
def skewed(tmp_path) -> list[str]:
    """Three shards of 47 records: short documents, and two very long ones (records 0 and 9)."""
    rng = random.Random(2)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) for _ in range(47)]
    texts[0], texts[9] = "x" * 3000, "y" * 1500
    docs = [record(text) for text in texts]
    parts = (docs[:20], docs[20:30], docs[30:])
    return [
        str(write_jsonl_zst(tmp_path / f"s{i}.jsonl.zst", part)) for i, part in enumerate(parts)
    ]


@pytest.mark.parametrize("queue_bytes", [1, 300])
def test_queues_stay_bounded_and_rows_read_as_if_alone(skewed, queue_bytes, record_budget):
    spec = spec_of(skewed, seq_len=15, num_rows=3, shuffle_files=True)
    rows = range(spec.num_rows)
    streams = RowStreams(spec, {row: initial_row_state() for row in rows}, queue_bytes=queue_bytes)
    windows, fullest = take_windows(streams, rows, 400)
    assert fullest < queue_bytes + largest_record(spec)
    assert any(streams._rows[row].own_scan is not None for row in rows)  # some row overflowed
    for row in rows:
        assert windows[row] == alone(spec, row, 400)


def test_states_resume_exactly_also_on_a_private_scan(skewed, record_budget):
    spec = spec_of(skewed, seq_len=15, num_rows=3, shuffle_files=True)
    rows = range(spec.num_rows)
    streams = RowStreams(spec, {row: initial_row_state() for row in rows}, queue_bytes=1)
    on_private_scan = 0
    for _ in range(12):
        take_windows(streams, rows, 25)
        saved = json.loads(json.dumps({row: streams.state(row) for row in rows}))
        states = {int(row): state for row, state in saved.items()}
        on_private_scan += any(streams._rows[row].own_scan is not None for row in rows)
        expected, _ = take_windows(streams, rows, 10)
        resumed = RowStreams(spec, states, queue_bytes=1)
        assert take_windows(resumed, rows, 10)[0] == expected
        for row in rows:
            assert alone(spec, row, 10, states[row]) == expected[row]
            assert resumed.state(row) == streams.state(row)
    assert on_private_scan


def test_a_row_that_can_never_get_a_document_is_an_error_not_a_hang(three_documents, record_budget):
    spec = spec_of([three_documents], num_rows=8, split="validation", set_names=("Nothing",))
    streams = RowStreams(spec, {row: initial_row_state() for row in range(8)}, queue_bytes=2)
    message = (
        r"config\.data\.validation: the 'validation' split has no usable document "
        r"\(its 3 records an epoch are 3 filtered\); is config\.data\.set_names="
    )
    with pytest.raises(InputError, match=message):
        streams.next_window(5)


def test_only_rows_that_are_dealt_nothing_usable_are_errors(tmp_path, record_budget):
    # Records 1 and 3 are broken. With 4 records an epoch and 2 rows, row 1 is dealt only
    # them, epoch after epoch; with 5 records an epoch, rows alternate between the places.
    good, bad = record("fine"), b"{not json"
    four = str(write_jsonl_zst(tmp_path / "four.jsonl.zst", [good, bad, good, bad]))
    spec = spec_of([four], split="train")
    streams = RowStreams(spec, {0: initial_row_state(), 1: initial_row_state()})
    assert streams.next_window(0).tolist()[:3] == packed("fine")[:3]
    message = r"'train' split can never deal row 1 of its 2 rows a usable document \(its 4 records"
    for shuffle_files in (False, True):  # shuffling the only shard changes nothing
        shuffled = dataclasses.replace(spec, shuffle_files=shuffle_files)
        streams = RowStreams(shuffled, {1: initial_row_state()})
        with pytest.raises(InputError, match=message):
            streams.next_window(1)
    five = str(write_jsonl_zst(tmp_path / "five.jsonl.zst", [good, bad, good, bad, good]))
    spec = dataclasses.replace(spec, files=(five,))
    streams = RowStreams(spec, {0: initial_row_state(), 1: initial_row_state()})
    assert streams.next_window(1).tolist() == (packed("fine") * 2)[:9]


GOOD, BAD = record("fine"), b"{not json"


def test_check_usable_reads_up_to_the_first_usable_document(tmp_path, monkeypatch):
    # Preflight's check: a split without one fails before a run trains; a good split costs
    # the records before its first document, not a read of the whole split.
    bad = str(write_jsonl_zst(tmp_path / "a.jsonl.zst", [BAD, BAD]))
    good = str(write_jsonl_zst(tmp_path / "b.jsonl.zst", [BAD, GOOD, *[GOOD] * 100]))
    with pytest.raises(InputError, match=r"no usable document \(its 2 records an epoch are 2 mal"):
        packing.check_usable(spec_of([bad], split="validation"))
    read, records = [], packing.iter_raw_records

    def counted(path):
        for raw in records(path):
            read.append(raw)
            yield raw

    monkeypatch.setattr(packing, "iter_raw_records", counted)
    packing.check_usable(spec_of([bad, good], split="validation"))
    assert len(read) == 4


def test_check_usable_says_it_is_still_reading(tmp_path, monkeypatch, caplog):
    # Records of another schema read a large split whole before its error: no silent hang.
    monkeypatch.setattr(packing, "PREFLIGHT_REPORT", 3)
    path = str(write_jsonl_zst(tmp_path / "a.jsonl.zst", [BAD] * 7 + [GOOD]))
    packing.check_usable(spec_of([path], split="train"))
    said = [r.getMessage() for r in caplog.records if "no usable document" in r.getMessage()]
    assert said == [
        "config.data.train: no usable document in its first 3 records yet (3 malformed); "
        "reading on",
        "config.data.train: no usable document in its first 6 records yet (6 malformed); "
        "reading on",
    ]


def test_with_shuffled_files_a_row_may_wait_epochs_for_its_document(tmp_path, record_budget):
    parts = {"a": [GOOD, BAD], "b": [BAD], "c": [BAD]}
    files = [str(write_jsonl_zst(tmp_path / f"{n}.jsonl.zst", part)) for n, part in parts.items()]
    spec = spec_of(files, shuffle_files=True, seed=1)
    # Row 1 of 2 gets the good record only in the epochs whose file order puts a.jsonl.zst at
    # place 1: not before epoch 2, so going a whole epoch without a document is no error here.
    assert [file_order(spec, epoch).index(files[0]) for epoch in range(3)] == [0, 0, 1]
    streams = RowStreams(spec, {1: initial_row_state()})
    assert streams.next_window(1).tolist() == (packed("fine") * 2)[:9]


def test_with_shuffled_files_only_rows_no_file_order_serves_are_errors(tmp_path, record_budget):
    one = str(write_jsonl_zst(tmp_path / "one.jsonl.zst", [GOOD]))
    three = str(write_jsonl_zst(tmp_path / "three.jsonl.zst", [BAD] * 3))
    spec = spec_of([one, three], num_rows=4, shuffle_files=True)
    # 4 records an epoch: the good one lies at place 0 or 3, whichever shard comes first; so
    # rows 0 and 3 get it in some epochs, and rows 1 and 2 never do.
    streams = RowStreams(spec, {row: initial_row_state() for row in range(4)})
    for row in (0, 3):
        assert streams.next_window(row).tolist() == (packed("fine") * 2)[:9]
    for row in (1, 2):
        with pytest.raises(InputError, match=f"can never deal row {row} of its 4 rows"):
            streams.next_window(row)
