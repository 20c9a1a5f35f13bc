"""LongEval "lines" retrieval (LongChat's `longeval/`), its format exactly.

A record of `num_lines` lines "line {id}: REGISTER_CONTENT is <{n}>", ids adjective-noun pairs
(LongEval's LRT-NL option) and n uniform in 1..50000, then the question for one line chosen
uniformly. Cases are generated from a seed, or read from LongChat's shipped test cases
(`{num_lines}_lines.jsonl`, fields `prompt` and `expected_number`) so that scores compare with
published ones. The shipped prompts end with "I need the number. " (a trailing space, which
today's generator script no longer writes); generated ones match the shipped files. Greedy,
100 new tokens; the answer is the last integer of the output (-1 when there is none).
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Container, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dga_jax.errors import InputError, MissingInputError
from dga_jax.eval.engine import Engine, with_bos
from dga_jax.eval.plots import line_plot
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

HEADER = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line "
    "index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. "
    "For each line index, memorize its corresponding <REGISTER_CONTENT>. At the end of the "
    "record, I will ask you to retrieve the corresponding <REGISTER_CONTENT> of a certain line "
    "index. Now the record start:\n\n"
)
FOOTER = (
    "\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {}? "
    "I need the number. "
)
STANDARD_SIZES = (200, 300, 400, 500, 600, 680)
MAX_NEW_TOKENS = 100

_ADJECTIVES = """able absent acid active agile airy alert amber ample ancient angry arctic
    ashen awake
    bald bitter blank bold brave brief bright brisk broad calm candid cheap chief civil clean
    clever cold cosmic crisp cruel curly daily damp dark dear deep dense dizzy dry dusty eager
    early eastern elder empty equal exact faint fancy feral fierce firm flat fond frail fresh
    frozen gentle giant glad golden grand grave green grim happy harsh hasty hazy heavy hollow
    humble icy idle inner jolly keen kind large late lazy lean little lively lone loud loyal
    lucky lunar mad magic major mellow merry mild minor misty modern moist moody muddy narrow
    neat noble odd olive open pale plain polite proud quick quiet rapid rare raw regal rich
    rigid ripe rocky rough round royal rusty sacred salty sandy scarce secret shaky sharp shy
    silent silver simple sleek slim slow small smooth snowy soft solar solid sour spare stale
    steep stern stiff stormy sunny sweet swift tame tender thick tidy tiny tough upper urban
    vague vast velvet vivid warm weary wet wide wild windy wise witty young zesty"""
ADJECTIVES = tuple(_ADJECTIVES.split())
_NOUNS = """acorn anchor ant apple arrow atlas badge bagel bamboo banjo barrel basket beacon beaver
    bell bison blossom boat bonnet boulder bridge broom bucket cabin cactus camel candle canoe
    canyon carpet castle cedar cello chair cherry chisel cider cliff clock cloud clover comet
    copper coral cotton crane crayon cricket crown cup daisy desert dolphin donkey dragon drum
    eagle easel engine falcon feather fern fiddle flute forest fossil fox garden garlic geyser
    glacier goat gravel guitar hammer harbor hazel helmet heron hill honey horizon iris island
    jacket jaguar jasmine kettle kite ladder lagoon lantern lemon lily lizard lobster locket
    magnet mango maple marble meadow mirror mitten moose mountain nectar needle nest oasis
    ocean onion orchid otter owl paddle panda parrot pebble pepper piano pigeon pillow pine
    planet plum pocket pony puddle pumpkin quartz quill rabbit radish raven reef ribbon river
    robin rocket saddle salmon sandal scarf shell shovel spider spoon squid stable statue
    summit swan tablet teapot thistle thunder tiger timber tulip turtle umbrella valley violin
    walnut walrus wagon whale willow window wizard yacht zebra"""
NOUNS = tuple(_NOUNS.split())


def line_ids(num_lines: int, rng: np.random.Generator, words=(ADJECTIVES, NOUNS)) -> list[str]:
    """`num_lines` distinct adjective-noun ids drawn from `words`."""
    adjectives, nouns = words
    if num_lines > len(adjectives) * len(nouns):
        raise ValueError(f"{num_lines} lines need more than {len(adjectives) * len(nouns)} ids")
    picks = rng.choice(len(adjectives) * len(nouns), size=num_lines, replace=False)
    return [f"{adjectives[p // len(nouns)]}-{nouns[p % len(nouns)]}" for p in picks]


def lines_case(num_lines: int, rng: np.random.Generator, words=(ADJECTIVES, NOUNS)) -> dict:
    """One test case in the shipped files' fields: prompt, expected_number, random_idx."""
    ids = line_ids(num_lines, rng, words)
    values = [int(v) for v in rng.integers(1, 50001, size=num_lines)]
    target = int(rng.integers(num_lines))
    return {
        "prompt": lines_prompt(ids, values, target),
        "expected_number": values[target],
        "random_idx": [ids[target], target],
        "num_lines": num_lines,
    }


def lines_prompt(ids: Sequence[str], values: Sequence[int], target: int) -> str:
    """The record of lines `ids` holding `values`, asking for line number `target`."""
    body = "".join(
        f"line {i}: REGISTER_CONTENT is <{v}>\n" for i, v in zip(ids, values, strict=True)
    )
    return HEADER + body + FOOTER.format(ids[target])


def last_integer(text: str) -> int:
    """LongEval's parse: the last run of digits in `text`, or -1 when there is none."""
    numbers = re.findall(r"\d+", text)
    return int(numbers[-1]) if numbers else -1


class Lines(GenerationTask):
    """`cases` generated cases per size in `num_lines` (seeded), or LongChat's shipped ones from
    `testcases_dir` (`{n}_lines.jsonl` per size)."""

    name = "lines"

    def __init__(
        self,
        num_lines: Sequence[int] = STANDARD_SIZES,
        cases: int = 50,
        seed: int = 0,
        testcases_dir: str | None = None,
    ):
        self.num_lines = distinct_ints(num_lines, "lines sizes", 1)
        self.cases = int_at_least(cases, "lines cases", 1)
        self.seed = int_at_least(seed, "lines seed", 0)  # numpy's seeds are >= 0
        # Absolute: the settings a rerun must match name the same files from any directory.
        self.testcases_dir = None if testcases_dir is None else os.path.abspath(testcases_dir)
        if testcases_dir is not None:
            self._check_files()
        elif max(self.num_lines) > len(ADJECTIVES) * len(NOUNS):
            raise InputError(
                f"lines sizes {self.num_lines}: generated cases have at most "
                f"{len(ADJECTIVES) * len(NOUNS)} distinct line ids"
            )

    def settings(self) -> dict[str, Any]:
        return {
            "num_lines": self.num_lines,
            "cases": self.cases,
            "seed": self.seed,
            "testcases_dir": self.testcases_dir,
        }

    def _check_files(self) -> None:
        for n in self.num_lines:
            path = Path(self.testcases_dir) / f"{n}_lines.jsonl"
            if not path.is_file():
                raise MissingInputError(
                    f"lines test cases {str(path)!r} not found: expected LongChat's "
                    f"longeval/evaluation/lines/testcases/{n}_lines.jsonl there"
                )

    def examples(
        self, engine: Engine, problems: Problems, done: Container[str] = frozenset()
    ) -> Iterator[Example]:
        for n in self.num_lines:
            for case_id, case in self._cases(n, problems):
                example_id = f"{n}/{case_id}"
                if example_id in done:
                    continue
                prompt = with_bos(engine.tokenizer, case["prompt"])
                fields = {"num_lines": n, "expected_number": case["expected_number"]}
                fields["prompt_tokens"] = len(prompt)
                example = Example(example_id, prompt, MAX_NEW_TOKENS, fields)
                if fits(engine, prompt, MAX_NEW_TOKENS):
                    yield example
                else:
                    problems.skip("prompt longer than the model's window", example.id)

    def _cases(self, n: int, problems: Problems) -> Iterator[tuple[int, dict]]:
        if self.testcases_dir is None:
            rng = np.random.default_rng([self.seed, n])
            for i in range(self.cases):
                yield i, lines_case(n, rng)
            return
        path = Path(self.testcases_dir) / f"{n}_lines.jsonl"
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():  # a blank line is no test case (as LongBench reads)
                    continue
                case = _parse_case(line)
                if case is None:
                    problems.skip("malformed lines test case", f"{path}:{number}")
                else:
                    yield number, case

    def score(self, example: Example, ids: list[int], text: str) -> dict[str, Any]:
        parsed = last_integer(text)
        return {
            "pred": text,
            "parsed": parsed,
            "score": float(parsed == example.fields["expected_number"]),
        }

    def answer(self, example: Example, engine: Engine) -> list[int]:
        return engine.tokenizer.encode(str(example.fields["expected_number"]))

    def summarize(self, records: Sequence[dict[str, Any]], out_dir: Path) -> Summary:
        """Accuracy (LongEval's EM) per size, with the mean prompt tokens."""
        groups: dict[int, list[dict]] = collections.defaultdict(list)
        for r in records:
            groups[r["num_lines"]].append(r)
        stats = {
            n: (
                float(np.mean([r["score"] for r in rs])),
                float(np.mean([r["prompt_tokens"] for r in rs])),
                len(rs),
            )
            for n, rs in sorted(groups.items())
        }
        forced = mean_by(records, "num_lines", "answer_token_accuracy")
        rows = [
            f"| {n} | {t:.0f} | {100 * a:.1f} | {100 * forced.get(n, 0):.1f} | {c} |"
            for n, (a, t, c) in stats.items()
        ]
        table = (
            "| lines | prompt tokens | accuracy % | answer tokens argmax % | cases |\n"
            "|---:|---:|---:|---:|---:|\n"
        )
        metrics = {
            "accuracy": float(np.mean([r["score"] for r in records])) if records else None,
            "by_lines": {str(n): a for n, (a, _, _) in stats.items()},
            "answer_token_accuracy_by_lines": {str(n): a for n, a in forced.items()},
        }
        files = []
        if stats:
            xs = [t for _, t, _ in stats.values()]
            ys = [100 * a for a, _, _ in stats.values()]
            files.append(
                line_plot(out_dir / "lines.png", {"lines": (xs, ys)}, "prompt tokens", "accuracy %")
            )
        return Summary(metrics, table + "\n".join(rows), files, headline=metrics["accuracy"])


def _parse_case(line: bytes) -> dict | None:
    """A shipped test case with a str prompt and an int expected_number, or None (also for a
    line that is not UTF-8)."""
    try:
        case = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(case, dict) or not isinstance(case.get("prompt"), str):
        return None
    if not isinstance(case.get("expected_number"), int):
        return None
    return case
