"""Runs tasks on an engine into an output directory, resumably.

    out/<task>.jsonl    one record per example, appended as chunks finish
    out/summary.json    every task's metrics, skipped-input counts, files written
    out/results.md      every task's table
    out/*.png           the tasks' plots

A rerun reads `<task>.jsonl` first and evaluates only the examples whose id is not there yet (the
task leaves those out before tokenizing their prompts), so an interrupted LongBench-E run
resumes where it stopped; a line cut off by a crash is dropped (and its example evaluated
again). Examples run longest first in chunks of `chunk` examples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tqdm

from dga_jax.eval.engine import Engine
from dga_jax.eval.task import Example, Problems, Summary, Task


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The records of a task's JSONL by id; unreadable lines (a crash's last) are ignored."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record:
                records[str(record["id"])] = record
    return records


def run_task(
    task: Task, engine: Engine, out_dir: Path, *, chunk: int = 32, progress: bool = False
) -> tuple[Summary, Problems, int]:
    """Evaluates the task's pending examples, then summarises all its records.

    Returns (summary, problems, examples evaluated now)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task.name}.jsonl"
    done = read_records(path)
    problems = Problems()
    pending = list(task.examples(engine, problems, done))
    pending.sort(key=_length, reverse=True)
    _drop_partial_line(path)
    with (
        open(path, "a", encoding="utf-8") as f,
        tqdm.tqdm(total=len(pending), desc=task.name, unit="example", disable=not progress) as bar,
    ):
        for first in range(0, len(pending), chunk):
            for record in task.evaluate(engine, pending[first : first + chunk]):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(min(chunk, len(pending) - first))
    records = list(read_records(path).values())
    return task.summarize(records, out_dir), problems, len(pending)


def _length(example: Example) -> int:
    return len(example.prompt)


def _drop_partial_line(path: Path) -> None:
    """Ends the file with a newline, so a line a crash cut short stays a line of its own."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def evaluate(
    tasks: Sequence[Task],
    engine: Engine,
    out_dir: str | Path,
    *,
    chunk: int = 32,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs every task, writes summary.json and results.md, returns the summary dict
    ({"info": ..., "tasks": {name: {"metrics", "skipped", "files", "evaluated_now"}}})."""
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"info": info or {}, "tasks": {}}
    sections = []
    for task in tasks:
        result, problems, now = run_task(task, engine, out_dir, chunk=chunk, progress=progress)
        summary["tasks"][task.name] = {
            "metrics": result.metrics,
            "skipped": problems.report(),
            "files": result.files,
            "headline": result.headline,
            "evaluated_now": now,
        }
        sections.append(_section(task.name, result, problems))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = "".join(f"- {k}: {v}\n" for k, v in (info or {}).items())
    (out_dir / "results.md").write_text(header + "\n" + "\n\n".join(sections) + "\n")
    return summary


def _section(name: str, result: Summary, problems: Problems) -> str:
    """A task's part of results.md: its table, then what was skipped."""
    lines = [f"## {name}", "", result.table]
    if problems.total():
        lines.append("")
        for reason, seen in problems.report().items():
            lines.append(f"- skipped {seen['count']}: {reason} (e.g. {seen['first'][0]})")
    return "\n".join(lines)


def one_line(summary: dict[str, Any]) -> str:
    """The headline number of each task, and the skipped count, on one line."""
    parts = []
    for name, task in summary["tasks"].items():
        value = task["headline"]
        shown = "n/a" if value is None else f"{value:.4g}"
        skipped = sum(s["count"] for s in task["skipped"].values())
        parts.append(f"{name} {shown}" + (f" ({skipped} skipped)" if skipped else ""))
    return "eval: " + ", ".join(parts)
