"""The global record order: per-epoch shard order and restarting a scan from a cursor."""

import itertools

from dga_jax.data.packing import Cursor, StreamSpec, file_order, scan
from dga_jax.data.slimpajama import list_shards


def spec_of(files, **changes) -> StreamSpec:
    return StreamSpec(files=tuple(files), tokenizer="byte", seq_len=8, num_rows=2, **changes)


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
