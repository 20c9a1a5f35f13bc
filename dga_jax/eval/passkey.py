"""Passkey retrieval, LongLoRA's prompt exactly (`passkey_retrivial.py`), and a length x depth grid.

A five-digit key hides at a random character offset of repeated filler text; the model must
repeat it. Trial t of a filler length n draws, from numpy's legacy RNG seeded with t, the prefix
length randint(0, n) and then the key randint(1, 50000), as the original does; with `depths`
the prefix is depth * n instead (the key stays that of the trial), giving a needle-in-a-haystack
grid. Greedy, max_new_tokens = the answer's token count, a pass only on an exact token match.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Container, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dga_jax.errors import InputError
from dga_jax.eval.engine import Engine, with_bos
from dga_jax.eval.plots import heatmap, line_plot
from dga_jax.eval.task import (
    Example,
    GenerationTask,
    Problems,
    Summary,
    distinct_ints,
    fits,
    int_at_least,
    mean_by,
)
from dga_jax.ops.checks import is_real

TASK_LINE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
GARBAGE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
QUESTION = "What is the pass key? The pass key is"


def longlora_lengths(max_tokens: int, interval: int = 1000) -> list[int]:
    """The filler lengths (characters) of LongLoRA's test points: point i of
    max_tokens // interval has int(3.75 * (i + 1) * interval // 1024 * 1024)."""
    interval = int_at_least(interval, "the passkey interval", 1)  # 0 divided by zero
    max_tokens = int_at_least(max_tokens, "the passkey max_tokens", 0)
    return [int(3.75 * (i + 1) * interval // 1024 * 1024) for i in range(max_tokens // interval)]


def passkey_prompt(garbage_chars: int, trial: int, depth: float | None = None) -> tuple[str, int]:
    """(prompt, pass key) of one trial: the key line after `garbage_chars` * depth characters of
    filler (random depth when None, as LongLoRA) and before the rest of the filler."""
    rng = np.random.RandomState(trial)
    prefix = int(rng.randint(0, garbage_chars)) if garbage_chars > 0 else 0
    key = int(rng.randint(1, 50000))
    if depth is not None:
        prefix = round(depth * garbage_chars)
    return passkey_text(prefix, garbage_chars - prefix, key), key


def passkey_text(prefix_chars: int, suffix_chars: int, key: int, garbage: str = GARBAGE) -> str:
    """The five lines of the prompt: the filler before and after the key line are both cut
    from the start of `garbage` repeated (joined by spaces), as LongLoRA cuts them."""
    filler = " ".join([garbage] * (max(prefix_chars, suffix_chars) // len(garbage) + 1))
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    return "\n".join([TASK_LINE, filler[:prefix_chars], info, filler[:suffix_chars], QUESTION])


def _depths(depths: Sequence[float]) -> list[float]:
    """`depths` as distinct floats in [0, 1], at least one; depths that share an id (its 6
    significant digits, `passkey_id`) would overwrite each other's records: an InputError."""
    depths = list(depths)
    if not depths or not all(is_real(d) and 0 <= d <= 1 for d in depths):
        raise InputError(f"passkey depths must be one or more fractions in [0, 1], got {depths}")
    by_id: dict[str, float] = {}
    for depth in map(float, depths):
        where = _depth_name(depth)
        if where in by_id:
            raise InputError(
                f"passkey depths {by_id[where]!r} and {depth!r} share the id {where!r}: give "
                "distinct depths that differ in their first 6 significant digits"
            )
        by_id[where] = depth
    return list(by_id.values())


def passkey_id(chars: int, depth: float | None, trial: int) -> str:
    """The id of a trial: "{filler chars}/{depth, or random}/{trial}"."""
    where = "random" if depth is None else _depth_name(depth)
    return f"{chars}/{where}/{trial}"


def _depth_name(depth: float) -> str:
    return f"{depth:g}"


class Passkey(GenerationTask):
    """Passkey retrieval at each filler length in `lengths` (characters; LongLoRA's points are
    `longlora_lengths(max_tokens)`), `trials` seeds each, at random depths or at each of
    `depths` (fractions in [0, 1])."""

    name = "passkey"

    def __init__(
        self,
        lengths: Sequence[int],
        trials: int = 10,
        depths: Sequence[float] | None = None,
    ):
        self.lengths = distinct_ints(lengths, "passkey lengths", 0)
        self.trials = int_at_least(trials, "passkey trials", 1)
        self.depths = None if depths is None else _depths(depths)

    def examples(
        self, engine: Engine, problems: Problems, done: Container[str] = frozenset()
    ) -> Iterator[Example]:
        depths: Sequence[float | None] = self.depths if self.depths is not None else [None]
        for chars, depth, trial in itertools.product(self.lengths, depths, range(self.trials)):
            example_id = passkey_id(chars, depth, trial)
            if example_id in done:
                continue
            example = self._example(engine, example_id, chars, depth, trial)
            if fits(engine, example.prompt, example.max_new_tokens):
                yield example
            else:
                problems.skip("prompt longer than the model's window", example.id)

    def settings(self) -> dict[str, Any]:
        return {"lengths": self.lengths, "trials": self.trials, "depths": self.depths}

    def _example(
        self, engine: Engine, example_id: str, chars: int, depth: float | None, trial: int
    ) -> Example:
        text, key = passkey_prompt(chars, trial, depth)
        prompt = with_bos(engine.tokenizer, text)
        answer = engine.tokenizer.encode(str(key))
        fields = {"garbage_chars": chars, "depth": depth, "trial": trial, "pass_key": key}
        fields.update(answer_ids=answer, prompt_tokens=len(prompt))
        return Example(example_id, prompt, len(answer), fields)

    def score(self, example: Example, ids: list[int], text: str) -> dict[str, Any]:
        return {"pred": text, "score": float(ids == example.fields["answer_ids"])}

    def answer(self, example: Example, engine: Engine) -> list[int]:
        return example.fields["answer_ids"]

    def summarize(self, records: Sequence[dict[str, Any]], out_dir: Path) -> Summary:
        """Accuracy per filler length (labelled by the mean prompt tokens, as LongLoRA reports
        it), and per (length, depth) cell when depths are set: a heatmap."""
        by_length = mean_by(records, "garbage_chars", "score")
        tokens = mean_by(records, "garbage_chars", "prompt_tokens")
        forced = mean_by(records, "garbage_chars", "answer_token_accuracy")
        trials = collections.Counter(r["garbage_chars"] for r in records)
        rows = [
            f"| {chars} | {tokens[chars]:.0f} | {100 * acc:.1f} | {100 * forced.get(chars, 0):.1f} "
            f"| {trials[chars]} |"
            for chars, acc in by_length.items()
        ]
        table = (
            "| filler chars | prompt tokens | accuracy % | answer tokens argmax % | trials |\n"
            "|---:|---:|---:|---:|---:|\n"
        )
        metrics: dict[str, Any] = {
            "accuracy": float(np.mean([r["score"] for r in records])) if records else None,
            "by_length": {str(c): acc for c, acc in by_length.items()},
            "answer_token_accuracy_by_length": {str(c): a for c, a in forced.items()},
        }
        series = {
            "passkey": ([tokens[c] for c in by_length], [100 * a for a in by_length.values()])
        }
        files = (
            [line_plot(out_dir / "passkey.png", series, "prompt tokens", "accuracy %")]
            if by_length
            else []
        )
        if self.depths is not None and records:
            files.append(self._heatmap(records, out_dir, metrics))
        return Summary(metrics, table + "\n".join(rows), files, headline=metrics["accuracy"])

    def _heatmap(self, records, out_dir: Path, metrics: dict[str, Any]) -> str:
        """Accuracy per (depth, length) cell as metrics["grid"] and passkey_grid.png."""
        cells = mean_by(records, ("depth", "garbage_chars"), "score")
        depths = sorted({d for d, _ in cells})
        lengths = sorted({c for _, c in cells})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (d, c), acc in cells.items():
            grid[depths.index(d), lengths.index(c)] = 100 * acc
        metrics["grid"] = {"depths": depths, "lengths": lengths, "accuracy": grid.tolist()}
        tokens = mean_by(records, "garbage_chars", "prompt_tokens")
        return heatmap(
            out_dir / "passkey_grid.png",
            grid,
            [f"{tokens[c]:.0f}" for c in lengths],
            [f"{d:g}" for d in depths],
            "prompt tokens",
            "depth",
        )
