"""Retrieval documents to train on: passkey- and lines-style, in the evaluation's formats, with
their own filler text and line ids (none of the evaluation's), each ending with its answer.

    python -m dga_jax.eval.synthetic --out runs/retrieval_corpus --documents 8000

writes a SlimPajama-format corpus, `train/` and `validation/` shards of `.jsonl.zst` records
`{"text", "meta": {"redpajama_set_name"}}`, interleaving the sample corpus's records (Python
sources, `dga_jax.data.corpus`) with the synthetic ones: the CPU replication trains on it
(`configs/tiny_retrieval_*.py`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import zstandard

from dga_jax.data.corpus import build_sample_corpus, default_corpus_dir
from dga_jax.data.slimpajama import list_shards, read_shard
from dga_jax.errors import InputError
from dga_jax.eval.lines import lines_case
from dga_jax.eval.passkey import passkey_text
from dga_jax.eval.task import int_at_least

FILLER = "The river runs to the sea. The hills are far away. The wind is cold tonight. We stay."
_ADJECTIVES = """amiable bashful cheery dapper earnest fickle giddy hearty jaunty kooky lanky
    meek nimble peppy quirky rowdy spunky tacky uppity vexed wacky zany bouncy chilly dreamy
    fluffy goofy husky itchy jumpy lumpy mushy nutty perky rusty soggy tangy wobbly yappy"""
_NOUNS = """armchair biscuit carrot doorbell eggplant fountain gumdrop hedgehog igloo jellybean
    kangaroo lemonade mushroom noodle octopus pancake quokka raincoat snowman toaster unicorn
    volcano waffle xylophone yoyo zucchini backpack cupcake dumpling flamingo goblin hamster"""
WORDS = (tuple(_ADJECTIVES.split()), tuple(_NOUNS.split()))
SET_NAME = "SyntheticRetrieval"
LINE_CHARS = 50  # about one "line <id>: REGISTER_CONTENT is <n>\n"


def passkey_document(rng: np.random.Generator, max_chars: int) -> str:
    """A passkey prompt of up to about max_chars characters, at a random depth, answered."""
    filler = int(rng.integers(0, max(1, max_chars - 300)))
    prefix = int(rng.integers(0, filler + 1))
    key = int(rng.integers(1, 50000))
    return passkey_text(prefix, filler - prefix, key, FILLER) + f" {key}."


def lines_document(rng: np.random.Generator, max_chars: int) -> str:
    """A LongEval lines prompt of up to about max_chars characters, answered."""
    num_lines = int(rng.integers(2, max(3, (max_chars - 600) // LINE_CHARS)))
    case = lines_case(num_lines, rng, WORDS)
    return case["prompt"] + str(case["expected_number"])


def documents(count: int, max_chars: int, seed: int) -> Iterator[str]:
    """`count` documents, passkey and lines alternately."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield (passkey_document if i % 2 == 0 else lines_document)(rng, max_chars)


def write_retrieval_corpus(
    out_dir: str | Path,
    *,
    documents_per_split: Sequence[int] = (8000, 400),
    max_chars: int = 1900,
    seed: int = 0,
    sample_dir: str | Path | None = None,
    shards: int = 4,
) -> Path:
    """Writes train/ and validation/ shards mixing the sample corpus's records with synthetic
    documents in a seeded random order; returns out_dir. `documents_per_split`: the synthetic
    documents of (train, validation). A split's shards from an earlier run replace its
    `retrieval_*` files whole: none is left over from a run with more shards."""
    _check_arguments(documents_per_split, seed, shards)
    sample = build_sample_corpus(sample_dir or default_corpus_dir())
    out_dir = Path(out_dir)
    for split, count, offset in zip(
        ("train", "validation"), documents_per_split, (0, 1), strict=True
    ):
        natural = [r["text"] for path in list_shards(str(sample / split)) for r in read_shard(path)]
        synthetic = list(documents(count, max_chars, seed * 2 + offset))
        _write_shards(out_dir / split, _interleave(natural, synthetic, seed), shards)
    return out_dir


def _check_arguments(documents_per_split: Sequence[int], seed: int, shards: int) -> None:
    """An InputError naming the argument that would otherwise write nothing (shards < 1), fail
    after the sample corpus is built (a negative seed) or pair splits and counts wrongly."""
    counts = list(documents_per_split)
    if len(counts) != 2:
        raise InputError(
            f"documents_per_split must be two counts (train, validation), got {counts}"
        )
    for split, count in zip(("train", "validation"), counts, strict=True):
        int_at_least(count, f"documents_per_split's {split} count", 0)
    int_at_least(seed, "seed", 0)  # numpy's seeds are >= 0
    int_at_least(shards, "shards", 1)


def _interleave(natural: list[str], synthetic: list[str], seed: int) -> list[dict]:
    """Both kinds of records as SlimPajama records, in one seeded random order."""
    records = [{"text": t, "meta": {"redpajama_set_name": "RedPajamaGithub"}} for t in natural]
    records += [{"text": t, "meta": {"redpajama_set_name": SET_NAME}} for t in synthetic]
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order]


def _write_shards(directory: Path, records: list[dict], shards: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("retrieval_*.jsonl.zst"):  # readers take every shard there
        stale.unlink()
    compressor = zstandard.ZstdCompressor(level=3)
    for shard in range(shards):
        lines = [json.dumps(r) + "\n" for r in records[shard::shards]]
        (directory / f"retrieval_{shard}.jsonl.zst").write_bytes(
            compressor.compress("".join(lines).encode())
        )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dga_jax.eval.synthetic", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--documents", type=int, default=8000, help="synthetic training documents")
    p.add_argument("--max_chars", type=int, default=1900)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.documents < 0:
        p.error(f"argument --documents: must be at least 0, got {args.documents}")
    validation = max(1, args.documents // 20)
    try:
        path = write_retrieval_corpus(
            args.out,
            documents_per_split=(args.documents, validation),
            max_chars=args.max_chars,
            seed=args.seed,
        )
    except InputError as e:
        p.error(str(e))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
