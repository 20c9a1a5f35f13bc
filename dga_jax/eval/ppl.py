"""Sliding-window perplexity of long documents, and how the loss falls with context.

Documents are the `.txt` files under a directory (PG19's layout: one book per file) or the
records of SlimPajama shards (`.jsonl`, `.jsonl.zst`, `.parquet`), each encoded behind BOS and
windowed on its own: no window spans two documents (LongLoRA's `eval.py` windows one token
stream of the whole corpus instead). Two conventions, named in every summary, both with a
stride between 1 and the window:

- "stride" (default; Hugging Face's perplexity guide): windows of `window` tokens start every
  `stride` tokens; each scores only the tokens new to it (the overlap is context), so every
  token but the first is scored once (with stride = window, the disjoint windows' first
  tokens are not scored either: they have no context); ppl = exp(total NLL / scored tokens).
- "longlora" (LongLoRA's `eval.py`, `get_as_batch`): windows start at 0, stride, ... below
  n - window, and the last of those starts is dropped; every token of each window but its first
  is scored, overlap included; ppl = exp(mean of the per-window mean NLLs). A document of at
  most window + stride tokens has no window. (LongLoRA passes each window as its own labels,
  so it too scores window - 1 targets per window.)

Each scored token is also counted by its position in its window (its context length), in
power-of-two buckets [1, 2), [2, 4), ...: PPL per bucket shows how loss falls with context.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Container, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dga_jax.data.slimpajama import SHARD_SUFFIXES, ReadStats, iter_raw_records, parse_record
from dga_jax.errors import InputError, MissingInputError
from dga_jax.eval.engine import Engine, with_bos
from dga_jax.eval.plots import line_plot
from dga_jax.eval.task import Example, Problems, Summary
from dga_jax.ops.checks import is_int

CONVENTIONS = ("stride", "longlora")


def windows(n: int, window: int, stride: int, convention: str) -> list[tuple[int, int, int]]:
    """(start, end, first scored position in the window) of each window over n tokens."""
    if convention == "longlora":
        starts = list(range(0, n - window, stride))[:-1]  # LongLoRA pops the last start
        return [(s, s + window, 1) for s in starts]
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        if end - begin < 2:  # a last window of one token (stride == window) predicts nothing
            break
        out.append((begin, end, max(1, prev_end - begin)))
        prev_end = end
        if end == n:
            break
    return out


def position_buckets(window: int) -> list[int]:
    """Bucket edges 1, 2, 4, ... up to and including `window`."""
    edges = [1]
    while edges[-1] < window:
        edges.append(min(2 * edges[-1], window))
    return edges


class Perplexity:
    """PPL of the documents at `data` (a directory of .txt files, or SlimPajama shards: a
    directory, glob or file), at most `max_documents` of them. `window` defaults to the engine's
    `max_length`; `stride` to window // 2 ("stride") or 256 ("longlora", LongLoRA's value)."""

    name = "ppl"

    def __init__(
        self,
        data: str,
        window: int | None = None,
        stride: int | None = None,
        convention: str = "stride",
        max_documents: int | None = None,
    ):
        if convention not in CONVENTIONS:
            raise ValueError(f"ppl convention must be one of {CONVENTIONS}, got {convention!r}")
        for what, value, least in (("window", window, 2), ("stride", stride, 1)):
            if value is not None and not is_int(value):  # a float fails in range() or a slice
                raise InputError(f"ppl {what} must be an integer >= {least}, got {value!r}")
        if max_documents is not None and (not is_int(max_documents) or max_documents < 1):
            raise InputError(
                f"ppl max_documents must be None or an integer >= 1, got {max_documents!r}"
            )
        # Absolute: the settings a rerun must match and the documents' ids name the same files
        # from any working directory, however the path was typed.
        self.data = os.path.abspath(data)
        self.files = _document_files(self.data)
        self.window, self.stride = _int_or_none(window), _int_or_none(stride)  # JSON: no NumPy
        self.convention, self.max_documents = convention, _int_or_none(max_documents)

    def settings(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "window": self.window,
            "stride": self.stride,
            "convention": self.convention,
            "max_documents": self.max_documents,
        }

    def sizes(self, max_length: int) -> tuple[int, int]:
        """The window (default: the engine's `max_length`) and the stride (default: the
        convention's), checked: 2 <= window <= max_length, 1 <= stride <= window (the command
        line checks them before any task runs)."""
        window = max_length if self.window is None else self.window
        if not 2 <= window <= max_length:
            raise ValueError(
                f"ppl window {window} must lie in [2, the model's {max_length} tokens]"
            )
        stride = self.stride
        if stride is None:
            stride = window // 2 if self.convention == "stride" else 256
        if not 1 <= stride <= window:
            default = " (the longlora default: give a stride)" if self.stride is None else ""
            raise ValueError(
                f"ppl stride {stride}{default} must lie in [1, the window of {window} tokens]"
            )
        return window, stride

    def examples(
        self, engine: Engine, problems: Problems, done: Container[str] = frozenset()
    ) -> Iterator[Example]:
        """The first `max_documents` usable documents; a done one (usable when it was scored)
        counts among them untokenized, so a resumed run ends at the same document."""
        window, stride = self.sizes(engine.max_length)
        count = 0
        for doc_id, where, text in _documents(self.files, problems):
            if self.max_documents is not None and count >= self.max_documents:
                return
            if doc_id not in done:
                ids = with_bos(engine.tokenizer, text)
                if len(ids) < 2 or not windows(len(ids), window, stride, self.convention):
                    problems.skip(f"document too short for a {window}-token window", where)
                    continue
                yield Example(doc_id, ids, 0, {"tokens": len(ids)})
            count += 1

    def evaluate(self, engine: Engine, examples: Sequence[Example]) -> list[dict[str, Any]]:
        """Scores every window of every document in one batched call."""
        window, stride = self.sizes(engine.max_length)
        spans = [windows(len(e.prompt), window, stride, self.convention) for e in examples]
        sequences = [e.prompt[s:t] for e, ws in zip(examples, spans, strict=True) for s, t, _ in ws]
        scores = iter(engine.score(sequences))
        edges = position_buckets(window)
        return [self._record(e, ws, scores, edges) for e, ws in zip(examples, spans, strict=True)]

    def _record(self, example: Example, spans, scores: Iterator, edges: list[int]) -> dict:
        """One document's NLL totals, per-window means and per-position-bucket sums."""
        bucket_nll, bucket_count = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1, int)
        window_means, nll, scored = [], 0.0, 0
        for _, _, first in spans:
            losses = -next(scores).logprobs[first - 1 :]  # positions first .. end-1
            positions = np.arange(first, first + len(losses))
            which = np.searchsorted(edges, positions, side="right") - 1
            np.add.at(bucket_nll, which, losses)
            np.add.at(bucket_count, which, 1)
            window_means.append(float(losses.mean()))
            nll, scored = nll + float(losses.sum()), scored + len(losses)
        return {
            "id": example.id,
            "tokens": example.fields["tokens"],
            "nll": nll,
            "scored": scored,
            "window_nll": window_means,
            "bucket_edges": edges,
            "bucket_nll": bucket_nll.tolist(),
            "bucket_count": bucket_count.tolist(),
        }

    def summarize(self, records: Sequence[dict[str, Any]], out_dir: Path) -> Summary:
        """Overall PPL by the convention, and PPL per position bucket (plotted)."""
        if not records:
            return Summary({"ppl": None, "convention": self.convention}, "(no documents)")
        if self.convention == "longlora":
            means = _floats([m for r in records for m in r["window_nll"]])
            ppl = _exp(float(np.mean(means)))
        else:
            total = _floats([r["nll"] for r in records]).sum()
            ppl = _exp(float(total) / sum(r["scored"] for r in records))
        edges = records[0]["bucket_edges"]
        nll = np.sum(_floats([r["bucket_nll"] for r in records]), axis=0)
        count = np.sum([r["bucket_count"] for r in records], axis=0)
        spans = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
        by_position = {k: _exp(x / c) for k, x, c in zip(spans, nll, count, strict=True) if c}
        metrics = {
            "ppl": ppl,
            "convention": self.convention,
            "documents": len(records),
            "scored_tokens": int(sum(r["scored"] for r in records)),
            "by_position": by_position,
        }
        rows = [f"| {k} | {v:.3f} |" for k, v in by_position.items()]
        table = (
            f"PPL {ppl:.3f} ({self.convention} convention, {len(records)} documents)\n\n"
            "| position in window | PPL |\n|---|---:|\n" + "\n".join(rows)
        )
        starts = [a for a, c in zip(edges[:-1], count, strict=True) if c]
        plot = line_plot(
            out_dir / "ppl_by_position.png",
            {"ppl": (starts, list(by_position.values()))},
            "position in window (tokens of context)",
            "perplexity",
            log_x=True,
        )
        return Summary(metrics, table, [plot], headline=ppl)


def _document_files(data: str) -> list[str]:
    """The .txt files and shards under a directory, at a path (taken as it is, even if it
    looks like a glob) or matching a glob; other files are no documents (a glob's README or
    CSV would be read as a shard of malformed records). An error names what was expected when
    there are none."""
    if os.path.isdir(data):
        found = sorted(
            str(p)
            for p in Path(data).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(data).parts)
        )
    elif os.path.isfile(data):
        found = [data]
    else:
        found = sorted(p for p in glob.glob(data, recursive=True) if os.path.isfile(p))
    found = [p for p in found if p.endswith((".txt", *SHARD_SUFFIXES))]
    if not found:
        raise MissingInputError(
            f"ppl data {data!r} holds no documents: expected .txt files (one document each, as "
            f"PG19) or SlimPajama shards ({', '.join(SHARD_SUFFIXES)})"
        )
    return found


def _int_or_none(value: int | None) -> int | None:
    return None if value is None else int(value)


def _documents(files: list[str], problems: Problems) -> Iterator[tuple[str, str, str]]:
    """(id, where, text) of every document: a .txt file whole (id and where: its path), or each
    good shard record (id `path:N`, where `path record N`). N counts records, not lines: the
    reader skips blank lines, and .zst and .parquet shards have no lines to point at."""
    for path in files:
        if path.endswith(".txt"):
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            if text:
                yield path, path, text
            else:
                problems.skip("empty document", path)
            continue
        for number, raw in enumerate(iter_raw_records(path), 1):
            stats = ReadStats()
            record = parse_record(raw, stats=stats)
            where = f"{path} record {number}"
            if record is None:
                reason = next(k for k, v in stats.as_dict().items() if v)
                problems.skip(f"shard record skipped ({reason})", where)
            else:
                yield f"{path}:{number}", where, record["text"]


def _floats(values: list) -> np.ndarray:
    """NLLs as read back from the records: null (a non-finite NLL, `task.json_line`) is NaN."""
    return np.array(values, dtype=float)


def _exp(nll: float) -> float:
    """e ** nll, inf past float range: a diverged model's mean NLL above ~709 raised
    OverflowError at the summary, after every document was scored."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf
