"""The sample corpus: SlimPajama-format shards built from the Python standard library's sources.

Used when no data path is configured (the tiny configs), so that training runs on any machine
with no download. The layout mirrors SlimPajama-627B:

    <out_dir>/train/chunk1/example_train_{i}.jsonl.zst
    <out_dir>/validation/chunk1/example_holdout_{i}.jsonl.zst

Each record is one `.py` file of `sysconfig.get_paths()["stdlib"]` (sorted, so the corpus is
the same on every build with the same Python), tagged `RedPajamaGithub`; every
`HOLDOUT_EVERY`-th file goes to validation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import zstandard

from dga_jax.errors import InputError

logger = logging.getLogger(__name__)

HOLDOUT_EVERY = 8
ZSTD_LEVEL = 3
MANIFEST = "manifest.json"
SET_NAME = "RedPajamaGithub"
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests"})


def default_corpus_dir() -> Path:
    """`$XDG_CACHE_HOME/dga_jax/sample_corpus` (`~/.cache/...` when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dga_jax" / "sample_corpus"


def build_sample_corpus(
    out_dir: str | os.PathLike,
    *,
    train_shards: int = 4,
    val_shards: int = 1,
    max_bytes: int = 6_000_000,
) -> Path:
    """Writes the sample corpus to `out_dir` (or reuses it) and returns `out_dir`.

    Takes standard-library files in sorted order until `max_bytes` of source text, deals the
    training files round-robin over `train_shards` shards and the held-out ones over
    `val_shards`. Deterministic and idempotent: a finished corpus (its `manifest.json` records
    the arguments) is reused; one built with other arguments is an error. The corpus is written
    to a temporary directory beside `out_dir` and renamed into place, so concurrent builders
    and interrupted builds never leave a partial corpus.
    """
    out_dir = Path(out_dir)
    params = {"train_shards": train_shards, "val_shards": val_shards, "max_bytes": max_bytes}
    if train_shards < 1 or val_shards < 1 or max_bytes < 1:
        raise ValueError(f"build_sample_corpus needs positive arguments, got {params}")
    if not _reuse(out_dir, params):
        logger.info("Building the sample corpus from %s into %s", _stdlib_dir(), out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            _write_corpus(tmp_dir, params)
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not _reuse(out_dir, params):  # not lost to a concurrent builder
                raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _reuse(out_dir: Path, params: dict[str, int]) -> bool:
    """Whether `out_dir` is a finished corpus of `params`; False if it is absent or an empty
    directory (one made for it: the rename replaces it)."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
            raise FileExistsError(f"{out_dir} exists but is not a sample corpus (no {MANIFEST})")
        return False
    try:
        built = json.loads(manifest.read_text())["params"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"sample corpus manifest {manifest} is unreadable ({type(error).__name__}: {error}):"
            f" delete {out_dir} to rebuild it"
        ) from error
    if built != params:
        raise InputError(
            f"sample corpus at {out_dir} was built with {built}, not {params}: delete it to "
            "rebuild it, or use another directory"
        )
    return True


def _write_corpus(root: Path, params: dict[str, int]) -> None:
    train, holdout = [], []
    for index, record in enumerate(_stdlib_records(params["max_bytes"])):
        (holdout if index % HOLDOUT_EVERY == 0 else train).append(record)
    files = _write_split(root / "train" / "chunk1", "example_train", train, params["train_shards"])
    files += _write_split(
        root / "validation" / "chunk1", "example_holdout", holdout, params["val_shards"]
    )
    manifest = {"params": params, "source": _stdlib_dir(), "records": len(train) + len(holdout)}
    manifest["files"] = [str(path.relative_to(root)) for path in files]
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _write_split(directory: Path, stem: str, records: list[bytes], num_shards: int) -> list[Path]:
    directory.mkdir(parents=True)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    paths = []
    for shard in range(num_shards):
        path = directory / f"{stem}_{shard}.jsonl.zst"
        path.write_bytes(compressor.compress(b"".join(records[shard::num_shards])))
        paths.append(path)
    return paths


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_records(max_bytes: int) -> Iterator[bytes]:
    """JSON lines of standard-library `.py` files, sorted by path, until `max_bytes` of text."""
    root = Path(_stdlib_dir())
    total = 0
    for relative in sorted(_stdlib_sources(root)):
        text = (root / relative).read_bytes().decode("utf-8", "replace")
        if not text.strip():
            continue
        meta = {"redpajama_set_name": SET_NAME, "source": f"python-stdlib/{relative}"}
        yield (json.dumps({"text": text, "meta": meta}) + "\n").encode()
        total += len(text)
        if total >= max_bytes:
            return


def _stdlib_sources(root: Path) -> Iterator[str]:
    for directory, dirs, names in os.walk(root):
        dirs[:] = [name for name in dirs if name not in SKIPPED_DIRS]
        for name in names:
            if name.endswith(".py"):
                yield Path(directory, name).relative_to(root).as_posix()
