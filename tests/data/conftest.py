"""Shard writers and tiny tokenizer files, all made by the tests themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece
import tokenizers
import zstandard
from tokenizers import decoders, models, pre_tokenizers, trainers

SET_NAMES = ("RedPajamaC4", "RedPajamaGithub", "RedPajamaWikipedia")
TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine and the early bird catches the worm",
    "dynamic group attention keeps the important tokens and groups the rest",
    "def f(x): return x + 1  # some code, with punctuation!",
] * 20
WORDS = sorted(set(" ".join(TOKENIZER_TEXT).split()))


def record(text, set_name: str = "RedPajamaC4") -> dict:
    return {"text": text, "meta": {"redpajama_set_name": set_name}}


def line(value) -> bytes:
    """A JSONL line: dicts are dumped, bytes and str are taken as they are."""
    if isinstance(value, dict):
        value = json.dumps(value)
    return (value if isinstance(value, bytes) else value.encode()) + b"\n"


def write_jsonl_zst(path: Path, values: list, *, frames: int = 1) -> Path:
    """Writes `values` as JSON lines compressed into `frames` consecutive zstd frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [line(value) for value in values]
    size = -(-len(lines) // frames)
    compressor = zstandard.ZstdCompressor()
    parts = [b"".join(lines[i : i + size]) for i in range(0, len(lines), size)]
    path.write_bytes(b"".join(compressor.compress(part) for part in parts))
    return path


def write_parquet(path: Path, records: list[dict], *, meta_as_json: bool) -> Path:
    """SlimPajama-6B style: `text`, `meta` (struct or JSON string) and `__index_level_0__`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metas = [r.get("meta") for r in records]
    columns = {
        "text": [r.get("text") for r in records],
        "meta": [json.dumps(m) for m in metas] if meta_as_json else metas,
        "__index_level_0__": list(range(len(records))),
    }
    pq.write_table(pa.table(columns), path)
    return path


def random_text(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


def train_sentencepiece(root: Path) -> Path:
    """A tiny SentencePiece BPE model (BOS 1, EOS 2) trained on `TOKENIZER_TEXT`, in `root`."""
    text = root / "text.txt"
    text.write_text("\n".join(TOKENIZER_TEXT))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(root / "tokenizer"),
        vocab_size=360,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return root / "tokenizer.model"


def train_hf_tokenizer(path: Path, special_tokens: list[str]) -> Path:
    """A tiny byte-level BPE `tokenizer.json` trained on `TOKENIZER_TEXT`."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory) -> Path:
    """tokenizer.json with `<unk>`, `<s>`, `</s>` as its first ids."""
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    return train_hf_tokenizer(path, ["<unk>", "<s>", "</s>"])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small mixed corpus: three jsonl.zst shards (one with bad lines, one truncated) and a
    parquet shard; documents of 1 to 40 words so that row streams wrap epochs quickly."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [record(random_text(rng, 40), SET_NAMES[i % 3]) for i in range(60)]
    write_jsonl_zst(root / "train/chunk1/example_train_0.jsonl.zst", docs[:15])
    bad = [*docs[15:20], b"{not json", {"meta": {}}, *docs[20:30], {"text": 7}]
    write_jsonl_zst(root / "train/chunk1/example_train_1.jsonl.zst", bad, frames=2)
    truncated = write_jsonl_zst(root / "train/chunk2/example_train_2.jsonl.zst", docs[30:45])
    truncated.write_bytes(truncated.read_bytes()[:-20])
    write_parquet(root / "train/chunk2/example_train_3.parquet", docs[45:], meta_as_json=True)
    return root
