"""LongBench-E (THUDM/LongBench, `LongBench/pred.py --e` and `eval.py --e`) as a task.

The 13 English datasets of LongBench-E, read from LongBench's `data.zip` layout (one
`{name}_e.jsonl` per dataset, records `{input, context, answers, length, all_classes, ...}`),
prompted with LongBench's templates (`config/dataset2prompt.json`), generated greedily up to
LongBench's answer lengths (`config/dataset2maxlen.json`) and stopping rule (samsum ends at its
first newline, which like EOS may not be the first new token; all three in
`longbench_prompts.py`), scored with its metrics (`dga_jax.eval.metrics`) and bucketed by the
records' `length` (words) as `eval.py --e` does (`longbench_scoring.py`).
The predictions are also written as `pred_e/<model_name>/<dataset>.jsonl`, so LongBench's own
`eval.py --e --model <model_name>` rescores them.

We run base models: pred.py's chat templates (`build_chat`, for models named llama2 / chatglm
/ vicuna / ... on all but trec, triviaqa, samsum, lsht, lcc, repobench-p) and its per-model
`post_process` (xgen, internlm) are left out, which is what pred.py does for a model name that
matches none of them. Two more departures, neither of which changes a LongBench-E score: a
samsum prediction leaves out the newline it stopped at (pred.py's decode keeps it; the
first-line rule of the scoring drops it either way), and eval.py scores a whole file with the
`all_classes` of its last line, where we use each record's own: every trec record carries the
same list.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections.abc import Container, Iterator, Sequence
from pathlib import Path
from typing import Any

from dga_jax.data.tokenizers import encodable
from dga_jax.errors import InputError, MissingInputError
from dga_jax.eval import metrics
from dga_jax.eval.engine import Engine
from dga_jax.eval.longbench_prompts import (
    DATASETS,
    MAX_NEW_TOKENS,
    PROMPTS,
    STOPS,
    longbench_max_input,
    middle_truncate,
)
from dga_jax.eval.longbench_scoring import (
    METRICS,
    average_scores,
    dataset_scores,
    longbench_score,
    markdown_table,
    write_predictions,
)
from dga_jax.eval.task import Example, GenerationTask, Problems, Summary, fits

PARAGRAPH = re.compile(r"Paragraph \d+")  # what retrieval_score reads from an answer
DATA_HINT = "the {name}_e.jsonl files of LongBench's data.zip (THUDM/LongBench on the HF hub)"


class LongBenchE(GenerationTask):
    """LongBench-E over `{dataset}_e.jsonl` files in `data_dir` (`datasets`: None for all 13).

    Prompts longer than `max_input` tokens (BOS included) are cut in the middle as pred.py
    does (`middle_truncate`). `max_input=None` takes LongBench's rule for the engine's window
    (`longbench_max_input`: 3500 for 4096, 7500 for 8192, ...); a given `max_input` is used as
    is and must leave room for each dataset's answer. Predictions go to
    `out_dir/pred_e/<model_name>/`.
    """

    name = "longbench_e"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        datasets: Sequence[str] | None = None,
        *,
        max_input: int | None = None,
        model_name: str = "dga-jax",
    ):
        if isinstance(datasets, str):
            datasets = [datasets]
        if datasets is None:
            datasets = DATASETS
        if not datasets:
            raise InputError("LongBench-E datasets is empty: name at least one, or None for all 13")
        # Each once: a dataset named twice would be generated twice (the same ids).
        datasets = tuple(dict.fromkeys(datasets))
        unknown = sorted(set(datasets) - set(DATASETS))
        if unknown:
            raise InputError(f"unknown LongBench-E datasets {unknown}: expected some of {DATASETS}")
        if max_input is not None and max_input < 2:
            raise InputError(f"max_input must be at least 2 tokens, got {max_input}")
        if not model_name or model_name == ".." or Path(model_name).name != model_name:
            raise InputError(f"model_name {model_name!r} must be one path component")
        # Absolute: the settings a rerun must match name the same files from any directory.
        self.data_dir = Path(os.path.abspath(data_dir))
        self.datasets = datasets
        self.max_input = max_input
        self.model_name = model_name

    def settings(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "datasets": list(self.datasets),
            "max_input": self.max_input,
            "model_name": self.model_name,
        }

    def examples(
        self, engine: Engine, problems: Problems, done: Container[str] = frozenset()
    ) -> Iterator[Example]:
        """Every usable record of every dataset but the `done` ones, in file order; ids are
        `{dataset}/{line index}`, so a done line is left out before it is parsed or tokenized.

        Raises MissingInputError before the first example when a file is missing."""
        paths = self.data_files()
        for dataset in self.datasets:
            yield from self._dataset_examples(engine, dataset, paths[dataset], problems, done)

    def data_files(self) -> dict[str, Path]:
        """The data file of each dataset, checked to exist (MissingInputError naming the
        missing ones)."""
        if not self.data_dir.is_dir():
            raise MissingInputError(
                f"LongBench-E data directory {str(self.data_dir)!r} does not exist: "
                f"it should hold {DATA_HINT}"
            )
        paths = {dataset: self.data_dir / f"{dataset}_e.jsonl" for dataset in self.datasets}
        missing = [str(path) for path in paths.values() if not path.is_file()]
        if missing:
            raise MissingInputError(
                f"LongBench-E data files missing: {', '.join(missing)}; expected {DATA_HINT}"
            )
        return paths

    def _dataset_examples(
        self, engine: Engine, dataset: str, path: Path, problems: Problems, done: Container[str]
    ) -> Iterator[Example]:
        """The examples of one file but the `done` ones; what cannot be used is counted in
        `problems`."""
        max_input = self.max_input_for(dataset, engine.max_length)
        with path.open("rb") as f:
            for index, line in enumerate(f):
                example_id = f"{dataset}/{index}"
                if example_id in done or not line.strip():
                    continue
                example = line_example(engine, dataset, example_id, line, max_input)
                if isinstance(example, str):
                    problems.skip(example, f"{path.name}:{index + 1}")
                else:
                    yield example

    def max_input_for(self, dataset: str, max_length: int) -> int:
        """The prompt limit for `dataset` in an engine's `max_length`: the given `max_input`
        or LongBench's rule; InputError when the answer does not fit beside it."""
        budget = MAX_NEW_TOKENS[dataset]
        max_input = self.max_input
        if max_input is None:
            max_input = longbench_max_input(max_length, budget)
        if max_input < 2 or max_input + budget > max_length:
            raise InputError(
                f"max_input {max_input} and {dataset}'s {budget} new tokens do not fit the "
                f"engine's max_length {max_length}"
            )
        return max_input

    def check(self, max_length: int) -> None:
        """Raises what `examples` would (a missing file, a max_input without room for an
        answer) before any work: the command line checks every task before the first runs."""
        self.data_files()
        for dataset in self.datasets:
            self.max_input_for(dataset, max_length)

    def score(self, example: Example, ids: list[int], text: str) -> dict[str, Any]:
        """{"pred": the completion as generated, "score": LongBench's score of it in [0, 1]}."""
        fields = example.fields
        value = longbench_score(fields["dataset"], text, fields["answers"], fields["all_classes"])
        return {"pred": text, "score": value}

    def summarize(self, records: Sequence[dict[str, Any]], out_dir: Path) -> Summary:
        """Per dataset, `eval.py --e`'s buckets plus "all", an average row, and the pred_e files.

        metrics: {"datasets": {dataset: {column: percent or None}}, "average": {column: ...},
        "records": {dataset: count}}; a bucket without records is None (eval.py: NaN).
        """
        grouped = self._group(records)
        scores = {dataset: dataset_scores(rows) for dataset, rows in grouped.items()}
        average = average_scores(scores.values())
        files = [
            str(write_predictions(Path(out_dir) / "pred_e" / self.model_name, dataset, rows))
            for dataset, rows in grouped.items()
            if rows
        ]
        counts = {dataset: len(rows) for dataset, rows in grouped.items()}
        table = markdown_table(scores, average)
        metrics = {"datasets": scores, "average": average, "records": counts}
        return Summary(metrics, table, files, headline=average["all"])

    def _group(self, records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """The records of each of the task's datasets, in file order."""
        grouped: dict[str, list[dict[str, Any]]] = {dataset: [] for dataset in self.datasets}
        for record in records:
            if record["dataset"] in grouped:
                grouped[record["dataset"]].append(record)
        for rows in grouped.values():
            rows.sort(key=_line_index)
        return grouped


def line_example(
    engine: Engine, dataset: str, example_id: str, line: bytes, max_input: int
) -> Example | str:
    """The example of one line of `{dataset}_e.jsonl`, its prompt cut to `max_input` tokens, or
    why it cannot be used."""
    record = parse_record(line, dataset)
    if isinstance(record, str):
        return record
    budget = MAX_NEW_TOKENS[dataset]
    prompt = middle_truncate(engine.tokenizer, PROMPTS[dataset].format(**record), max_input)
    if not fits(engine, prompt, budget):
        return "prompt does not fit after middle truncation"
    fields = {key: record[key] for key in ("answers", "all_classes", "length")}
    stop, min_new_tokens = STOPS.get(dataset, ((), 0))
    return Example(example_id, prompt, budget, {"dataset": dataset, **fields}, stop, min_new_tokens)


def parse_record(line: bytes, dataset: str) -> dict[str, Any] | str:
    """The record of one line of `{dataset}_e.jsonl`, or why it cannot be used."""
    try:
        record = json.loads(line.decode("utf-8-sig"))  # a file saved with a BOM: its first line
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "malformed JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    text_fields = [name for _, name, _, _ in string.Formatter().parse(PROMPTS[dataset]) if name]
    for name in [*text_fields, "answers", "all_classes", "length"]:
        if name not in record:
            return f"missing field {name!r}"
    for name in text_fields:
        if not isinstance(record[name], str):
            return f"field {name!r} is not a string"
    return _scoring_problem(record, dataset) or record


def _scoring_problem(record: dict[str, Any], dataset: str) -> str | None:
    """Why the scoring fields of a record would make its metric or the writing of its record
    (the runner's JSONL, the pred_e files) fail, if they would."""
    answers, classes, length = record["answers"], record["all_classes"], record["length"]
    if not _strings(answers):
        return "field 'answers' is not a list of strings"
    needs_classes = METRICS[dataset] is metrics.classification_score
    if not (_strings(classes) or (classes is None and not needs_classes)):
        return "field 'all_classes' is not a list of strings"
    if isinstance(length, bool) or not isinstance(length, int | float) or not math.isfinite(length):
        return "field 'length' is not a number"
    for name in ("answers", "all_classes"):  # JSON's "\ud800" escape: UTF-8 cannot write it
        if any(encodable(text) != text for text in record[name] or ()):
            return f"field {name!r} is not UTF-8 text (a lone surrogate)"
    if dataset == "passage_retrieval_en" and not all(PARAGRAPH.search(a) for a in answers):
        return "answer without 'Paragraph N'"
    return None


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _line_index(record: dict[str, Any]) -> int:
    return int(record["id"].rsplit("/", 1)[1])
