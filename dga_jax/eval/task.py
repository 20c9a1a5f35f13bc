"""The shape of an evaluation task, and the bookkeeping every task shares.

A task turns its inputs into `Example`s (a token-id prompt within the engine's limit, plus the
fields its scoring needs), evaluates a list of them into one JSON record each (keyed by the
example's `id`: a rerun passes the finished ids in, and the task leaves those out before it
tokenizes them), and summarises all its records into metrics, a Markdown table and plots. Bad
input never stops a run: a malformed record is counted in `Problems` with where it was and
why, and reported in the summary.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Container, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dga_jax.errors import InputError
from dga_jax.eval.engine import Engine, stop_token
from dga_jax.ops.checks import is_int


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt of a task. `fields` are JSON values the task scores with and writes out.

    A completion ends at EOS, at the token of one of `stop` (`stop_token`: the last of each
    text's encoding) or after `max_new_tokens`; neither EOS nor a stop token is chosen among
    its first `min_new_tokens` tokens."""

    id: str  # unique within the task: the resume key
    prompt: list[int]  # token ids, BOS included, prompt + max_new_tokens <= engine.max_length
    max_new_tokens: int
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0


@dataclasses.dataclass
class Summary:
    """What a task reports: metrics (JSON), a Markdown table, the files it wrote (plots...),
    and its headline number (accuracy, PPL, average score) for the one-line summary."""

    metrics: dict[str, Any]
    table: str
    files: list[str] = dataclasses.field(default_factory=list)
    headline: float | None = None


class Problems:
    """Counts what was skipped and why, keeping the first few places of each reason."""

    KEEP = 5

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: dict[str, list[str]] = collections.defaultdict(list)

    def skip(self, reason: str, where: str) -> None:
        """Records one skipped item: `reason` ("malformed JSON"), `where` ("qasper_e.jsonl:7")."""
        self.counts[reason] += 1
        if len(self.where[reason]) < self.KEEP:
            self.where[reason].append(where)

    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict[str, Any]:
        """{reason: {"count": n, "first": [where, ...]}} for the summary JSON."""
        return {r: {"count": n, "first": self.where[r]} for r, n in sorted(self.counts.items())}


class Task(Protocol):
    """An evaluation: `examples`, then `evaluate` in chunks, then `summarize`."""

    name: str

    def examples(
        self, engine: Engine, problems: Problems, done: Container[str] = frozenset()
    ) -> Iterator[Example]:
        """Every example of the task but those whose id is in `done`, prompts fitted to
        `engine.max_length` by the task's rule; what cannot be used is counted in `problems`
        instead. A done id is left out before its prompt is tokenized (it was usable when its
        record was written), so resuming a long run does not tokenize it again."""
        ...

    def evaluate(self, engine: Engine, examples: Sequence[Example]) -> list[dict[str, Any]]:
        """One JSON record per example, in order, each with the example's "id"."""
        ...

    def settings(self) -> dict[str, Any]:
        """The task's parameters as JSON: records made with other settings are not resumed
        (an id names an example, not the settings it was evaluated with)."""
        ...

    def summarize(self, records: Sequence[dict[str, Any]], out_dir: Path) -> Summary:
        """Metrics and table over all records; plots and other files are written to out_dir."""
        ...


class GenerationTask:
    """A task scored on greedy completions: subclasses define `examples` and `score`.

    A task whose examples have one right answer (`answer`) also scores it teacher-forced: the
    answer's summed log-probability after the prompt ("answer_logprob") and the share of its
    tokens that are the model's argmax ("answer_token_accuracy"), a graded view of retrieval
    that moves before exact matches do.
    """

    name = "generation"

    def evaluate(self, engine: Engine, examples: Sequence[Example]) -> list[dict[str, Any]]:
        """Generates every example's completion (batched by max_new_tokens and stopping rule),
        then scores it."""
        records: list[dict[str, Any]] = [{} for _ in examples]
        groups: dict[tuple[int, tuple[str, ...], int], list[int]] = collections.defaultdict(list)
        for i, example in enumerate(examples):
            groups[example.max_new_tokens, example.stop, example.min_new_tokens].append(i)
        for (budget, stop, least), rows in groups.items():
            stops = [stop_token(engine.tokenizer, text) for text in stop]
            prompts = [examples[i].prompt for i in rows]
            outputs = engine.generate(prompts, budget, stop_tokens=stops, min_new_tokens=least)
            for i, ids in zip(rows, outputs, strict=True):
                text = engine.tokenizer.decode(ids)
                record = {"id": examples[i].id, **examples[i].fields}
                record.update(self.score(examples[i], ids, text))
                records[i] = record
        self._teacher_forced(engine, examples, records)
        return records

    def answer(self, example: Example, engine: Engine) -> list[int] | None:
        """The tokens of the example's one right answer, if it has one (None: no such score)."""
        return None

    def _teacher_forced(self, engine: Engine, examples: Sequence[Example], records) -> None:
        """Adds answer_logprob and answer_token_accuracy to the records of answered examples."""
        answers = [self.answer(example, engine) for example in examples]
        rows = [i for i, answer in enumerate(answers) if answer]
        sequences = [examples[i].prompt + answers[i] for i in rows]
        for i, scores in zip(rows, engine.score(sequences) if rows else [], strict=True):
            n = len(answers[i])
            records[i]["answer_logprob"] = float(scores.logprobs[-n:].sum())
            records[i]["answer_token_accuracy"] = float(scores.greedy[-n:].mean())

    def score(self, example: Example, ids: list[int], text: str) -> dict[str, Any]:
        """The record fields of one completion (`ids`, decoded as `text`): at least "score"."""
        raise NotImplementedError


def mean_by(
    records: Sequence[dict[str, Any]], key: str | tuple[str, ...], field: str
) -> dict[Any, float]:
    """The mean of `field` over the records grouped by `key` (a tuple of keys: grouped by their
    values' tuple), in key order; records without `field` are left out."""
    groups: dict[Any, list[float]] = collections.defaultdict(list)
    for r in records:
        if field in r:
            group = tuple(r[k] for k in key) if isinstance(key, tuple) else r[key]
            groups[group].append(r[field])
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


def int_at_least(value: int, what: str, least: int) -> int:
    """`value` as a Python int >= `least`; an InputError naming `what` otherwise (a float or a
    bool would fail later in a range or a slice, deep in the run)."""
    if not is_int(value) or value < least:
        raise InputError(f"{what} must be an integer >= {least}, got {value!r}")
    return int(value)


def distinct_ints(values: Sequence[int], what: str, least: int) -> list[int]:
    """`values` as a non-empty list of distinct Python ints >= `least` (JSON writes them; NumPy
    ints it refuses); an InputError naming `what` otherwise: a repeated value would give two
    examples one id, evaluated twice and kept once."""
    values = list(values)
    if not values:
        raise InputError(f"{what} must hold at least one value, got none")
    for value in values:
        int_at_least(value, what, least)
    repeated = sorted({int(v) for v in values if values.count(v) > 1})
    if repeated:
        raise InputError(f"{what} must be distinct, got {repeated} more than once")
    return [int(v) for v in values]


def fits(engine: Engine, prompt: Sequence[int], max_new_tokens: int) -> bool:
    """Whether a prompt leaves room for `max_new_tokens` within the engine's limit."""
    return len(prompt) + max_new_tokens <= engine.max_length


def json_text(value: Any) -> str:
    """`value` as strict JSON (indented): NaN and infinities, which `json.dumps` writes as bare
    `NaN` that other JSON readers refuse (a passkey cell without records), become null."""
    return json.dumps(_finite(value), indent=2, allow_nan=False) + "\n"


def json_line(record: dict[str, Any]) -> str:
    """One record as a line of strict JSON (non-finite floats as null, as `json_text`): a
    diverged model's NLL of inf or NaN was written as a bare `Infinity` that strict readers
    (jq, JavaScript, Go) refuse. Readers take null where a number may be non-finite."""
    return json.dumps(_finite(record), ensure_ascii=False, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def replace_text(path: Path, text: str) -> None:
    """Writes `text` to `path` in one step: a crash leaves the old file or the new one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
