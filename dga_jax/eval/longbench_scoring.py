"""LongBench-E's scoring, as `LongBench/eval.py --e` does it, for `longbench.LongBenchE`.

Each dataset's metric (`dga_jax.eval.metrics`, eval.py's dataset2metric) with the first-line
rule of the few-shot datasets, the records bucketed by their `length` (words) into 0-4k / 4-8k
/ 8k+, the per-dataset and average percentages with eval.py's rounding, the results table, and
the `pred_e/<model_name>/<dataset>.jsonl` files that LongBench's own `eval.py --e` rescores.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dga_jax.eval import metrics
from dga_jax.eval.task import replace_text

# eval.py's dataset2metric.
METRICS: dict[str, Callable[..., float]] = {
    "qasper": metrics.qa_f1_score,
    "multifieldqa_en": metrics.qa_f1_score,
    "hotpotqa": metrics.qa_f1_score,
    "2wikimqa": metrics.qa_f1_score,
    "gov_report": metrics.rouge_score,
    "multi_news": metrics.rouge_score,
    "trec": metrics.classification_score,
    "triviaqa": metrics.qa_f1_score,
    "samsum": metrics.rouge_score,
    "passage_count": metrics.count_score,
    "passage_retrieval_en": metrics.retrieval_score,
    "lcc": metrics.code_sim_score,
    "repobench-p": metrics.code_sim_score,
}
# Few-shot datasets whose answer is the first line of the prediction (eval.py; lsht is Chinese).
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum"})
BUCKETS = ("0-4k", "4-8k", "8k+")
COLUMNS = (*BUCKETS, "all")


def longbench_score(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None
) -> float:
    """A record's score as eval.py's scorer_e computes it: the few-shot datasets' prediction
    cut to its first line, then the best of the dataset's metric over the answers (0 without
    answers)."""
    if dataset in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[dataset]
    return max([0.0, *(metric(prediction, answer, all_classes=all_classes) for answer in answers)])


def length_bucket(length: float) -> str:
    """eval.py --e's bucket of a record's `length` (words of its context)."""
    if length < 4000:
        return "0-4k"
    return "4-8k" if length < 8000 else "8k+"


def dataset_scores(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """{bucket: percent} as eval.py --e (round(100 * np.mean, 2), None where eval.py has NaN),
    plus "all": the mean over every record as eval.py without --e rounds it."""
    buckets: dict[str, list[float]] = {name: [] for name in BUCKETS}
    for record in records:
        buckets[length_bucket(record["length"])].append(record["score"])
    # np.float64's round (scale, rint, unscale) is what eval.py applies, not Python's.
    out = {name: float(round(100 * np.mean(v), 2)) if v else None for name, v in buckets.items()}
    total = sum(record["score"] for record in records)
    out["all"] = round(100 * total / len(records), 2) if records else None
    return out


def average_scores(scores: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Each column's mean over the datasets that have it, rounded to 2 decimals."""
    average: dict[str, float | None] = {}
    for column in COLUMNS:
        values = [row[column] for row in scores if row[column] is not None]
        average[column] = round(sum(values) / len(values), 2) if values else None
    return average


def markdown_table(
    scores: dict[str, dict[str, float | None]], average: dict[str, float | None]
) -> str:
    """One row per dataset and an average row; columns 0-4k, 4-8k, 8k+, all (percent)."""
    lines = ["| dataset | " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * len(COLUMNS) + "|"]
    for name, row in [*scores.items(), ("average", average)]:
        cells = ["-" if row[column] is None else f"{row[column]:.2f}" for column in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_predictions(directory: Path, dataset: str, records: Sequence[dict[str, Any]]) -> Path:
    """`directory/<dataset>.jsonl` in pred.py's format, one json.dump(..., ensure_ascii=False)
    line `{"pred", "answers", "all_classes", "length"}` per record; replaced whole."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dataset}.jsonl"
    keys = ("pred", "answers", "all_classes", "length")
    lines = [json.dumps({key: r[key] for key in keys}, ensure_ascii=False) + "\n" for r in records]
    replace_text(path, "".join(lines))
    return path
