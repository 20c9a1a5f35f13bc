"""The sample corpus built from the standard library: layout, determinism, reuse, and reading it."""

import json
import logging

import pytest

from dga_jax.data.corpus import build_sample_corpus
from dga_jax.data.pipeline import DataConfig, make_eval_iterator, make_train_iterator
from dga_jax.data.slimpajama import ReadStats, list_shards, read_shard
from dga_jax.data.tokenizers import ByteTokenizer
from dga_jax.errors import InputError

SMALL = {"train_shards": 3, "val_shards": 2, "max_bytes": 400_000}


def corpus_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_layout_and_records(tmp_path):
    root = build_sample_corpus(tmp_path / "corpus", **SMALL)
    assert sorted(corpus_files(root)) == [
        "manifest.json",
        "train/chunk1/example_train_0.jsonl.zst",
        "train/chunk1/example_train_1.jsonl.zst",
        "train/chunk1/example_train_2.jsonl.zst",
        "validation/chunk1/example_holdout_0.jsonl.zst",
        "validation/chunk1/example_holdout_1.jsonl.zst",
    ]
    stats = ReadStats()
    records = [r for path in list_shards(str(root)) for r in read_shard(path, stats=stats)]
    manifest = json.loads((root / "manifest.json").read_text())
    assert stats == ReadStats(documents=manifest["records"]) and len(records) > 10
    assert {r["meta"]["redpajama_set_name"] for r in records} == {"RedPajamaGithub"}
    assert sum(len(r["text"]) for r in records) >= SMALL["max_bytes"]
    assert any("def " in r["text"] for r in records)


def test_deterministic_and_reused(tmp_path):
    first = build_sample_corpus(tmp_path / "one", **SMALL)
    second = build_sample_corpus(tmp_path / "two", **SMALL)
    assert corpus_files(first) == corpus_files(second)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert build_sample_corpus(first, **SMALL) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no temporary left
    with pytest.raises(ValueError, match="built with"):
        build_sample_corpus(first, **{**SMALL, "train_shards": 4})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a sample corpus"):
        build_sample_corpus(tmp_path / "other", **SMALL)


def test_an_empty_directory_made_for_the_corpus_is_used(tmp_path):
    # It was refused as "not a sample corpus", as if it held someone's files.
    (tmp_path / "made").mkdir()
    root = build_sample_corpus(tmp_path / "made", **SMALL)
    assert corpus_files(root) == corpus_files(build_sample_corpus(tmp_path / "fresh", **SMALL))


@pytest.mark.parametrize("manifest", ["{cut", "{}", "[]"], ids=["cut", "old", "list"])
def test_an_unreadable_manifest_is_an_input_error_naming_it(tmp_path, manifest):
    # A cut or old manifest ended in a JSONDecodeError / KeyError traceback.
    root = build_sample_corpus(tmp_path / "corpus", **SMALL)
    (root / "manifest.json").write_text(manifest)
    with pytest.raises(InputError, match=rf"manifest {root / 'manifest.json'} is unreadable"):
        build_sample_corpus(root, **SMALL)


def test_pipeline_reads_the_sample_corpus_when_no_path_is_set(tmp_path, caplog):
    config = DataConfig(seq_len=64, global_batch_size=4, sample_corpus_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.INFO):
        it = make_train_iterator(config, process_index=0, process_count=1)
    assert "sample corpus" in caplog.text and "standard library" in caplog.text
    batches = [next(it) for _ in range(3)]
    tok = ByteTokenizer()
    assert all(b["inputs"].shape == (4, 64) and b["inputs"].dtype.name == "int32" for b in batches)
    assert batches[0]["inputs"][0, 0] == tok.bos_id
    assert int(max(b["inputs"].max() for b in batches)) < tok.vocab_size
    sources = [r["text"] for p in list_shards(str(tmp_path / "c" / "train")) for r in read_shard(p)]
    assert any(tok.decode(batches[0]["inputs"][0, 1:]) in text for text in sources)
    evals = list(make_eval_iterator(config, process_index=0, process_count=1))
    assert len(evals) == config.eval_batches
