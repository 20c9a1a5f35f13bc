"""The synthetic training documents, and the CPU replication end to end (its quick version)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dga_jax.data.slimpajama import list_shards, read_shard
from dga_jax.eval import lines, passkey, synthetic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def replication(monkeypatch):
    """benchmarks/eval_replication.py as a module (the scripts import their helpers by bare
    name)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("eval_replication")


def synthetic_count(corpus: Path, split: str) -> int:
    records = [r for p in list_shards(str(corpus / split)) for r in read_shard(p)]
    return sum(r["meta"]["redpajama_set_name"] == synthetic.SET_NAME for r in records)


def test_training_documents_use_the_formats_with_other_fillers_and_ids():
    rng = np.random.default_rng(0)
    doc = synthetic.passkey_document(rng, 800)
    key = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", doc).group(1)
    assert doc.startswith(passkey.TASK_LINE + "\n") and doc.endswith(f"{passkey.QUESTION} {key}.")
    assert passkey.GARBAGE not in doc and len(doc) <= 800
    doc = synthetic.lines_document(rng, 1200)
    asked = re.search(r"in line (\S+)\? I need the number\. (\d+)$", doc)
    assert doc.startswith(lines.HEADER)
    assert f"line {asked[1]}: REGISTER_CONTENT is <{asked[2]}>\n" in doc
    adjective, noun = asked[1].split("-")
    assert adjective not in lines.ADJECTIVES and noun not in lines.NOUNS


def test_the_corpus_mixes_code_and_retrieval_documents(tmp_path):
    out = synthetic.write_retrieval_corpus(tmp_path / "corpus", documents_per_split=(30, 6))
    kinds = [
        r["meta"]["redpajama_set_name"]
        for p in list_shards(str(out / "train"))
        for r in read_shard(p)
    ]
    assert kinds.count(synthetic.SET_NAME) == 30 and kinds.count("RedPajamaGithub") > 100
    validation = [r for p in list_shards(str(out / "validation")) for r in read_shard(p)]
    assert sum(r["meta"]["redpajama_set_name"] == synthetic.SET_NAME for r in validation) == 6


def test_the_corpus_is_rewritten_when_its_sizes_change_and_quick_runs_apart(tmp_path, replication):
    corpus = tmp_path / "corpus"
    replication.ensure_corpus(corpus, {"documents": (6, 2), "max_chars": 600})
    shard = next((corpus / "train").iterdir())
    written = shard.stat().st_mtime_ns
    replication.ensure_corpus(corpus, {"documents": (6, 2), "max_chars": 600})  # the same: kept
    assert shard.stat().st_mtime_ns == written
    replication.ensure_corpus(corpus, {"documents": (9, 3), "max_chars": 600})
    assert (synthetic_count(corpus, "train"), synthetic_count(corpus, "validation")) == (9, 3)
    assert json.loads((corpus / "corpus.json").read_text())["documents_per_split"] == [9, 3]
    (corpus / "corpus.json").unlink()  # a corpus of unknown sizes is rewritten too
    replication.ensure_corpus(corpus, {"documents": (4, 1), "max_chars": 600})
    assert synthetic_count(corpus, "train") == 4
    assert replication.workdir(tmp_path, quick=True) == tmp_path / "quick"
    assert replication.workdir(tmp_path, quick=False) == tmp_path


def test_an_out_that_cannot_be_a_folder_is_refused_before_training(tmp_path, replication, capsys):
    taken = tmp_path / "replication"
    taken.write_text("")  # a file: the report was written after hours of training and failed
    with pytest.raises(SystemExit):
        replication.parse_args(["--out", str(taken)])
    assert f"argument --out: cannot make folder '{taken}'" in capsys.readouterr().err


def test_the_quick_replication_trains_evaluates_and_reports(tmp_path):
    command = [sys.executable, "benchmarks/eval_replication.py", "--quick", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "quick" / "replication.md").read_text()
    for title in ("Passkey", "LongEval lines", "perplexity", "P_sparse", "Noise", "mass"):
        assert f"### {title}" in report or title in report, title
    rows = re.findall(r"^\| (dense|dga) \| (\w+) \|", report, re.MULTILINE)
    # passkey, lines, their two teacher-forced tables, perplexity, noise KL (dense vs DGA only)
    assert rows.count(("dense", "dga")) == 6 and rows.count(("dga", "dense")) == 6
    for baseline in ("streaming_llm", "lm_infinite", "minference"):
        assert rows.count(("dense", baseline)) == 5 and ("dga", baseline) not in rows
    assert "streaming_llm start_size=4, recent_size=96" in report  # scaled to 768 tokens
    runs = json.loads((tmp_path / "quick" / "replication.json").read_text())["runs"]
    assert sorted(runs) == [
        "dense_as_dense",
        "dense_as_dga",
        "dense_as_lm_infinite",
        "dense_as_minference",
        "dense_as_streaming_llm",
        "dga_as_dense",
        "dga_as_dga",
    ]
    for summary in runs.values():
        assert summary["tasks"]["passkey"]["evaluated_now"] == 4
        assert summary["tasks"]["lines"]["evaluated_now"] == 2
        assert summary["tasks"]["ppl"]["metrics"]["ppl"] > 1
