"""Runs tasks on an engine into an output directory, resumably.

    out/<task>.jsonl    one record per example, appended as chunks finish
    out/<task>.settings.json  the settings those records were made with
    out/summary.json    every task's metrics, skipped-input counts, files written
    out/results.md      every task's table
    out/*.png           the tasks' plots

A rerun reads `<task>.jsonl` first and evaluates only the examples whose id is not there yet (the
task leaves those out before tokenizing their prompts), so an interrupted LongBench-E run
resumes where it stopped; a line cut off by a crash is dropped (and its example evaluated
again). An id names an example, not the settings it ran with, so a rerun whose settings (the
task's, the engine's max_length, the run's `info`: checkpoint, attention...) differ from those
in `<task>.settings.json` is refused, naming the keys that differ, and nothing is written.
Examples run longest first in chunks of `chunk` examples. summary.json, results.md and the
settings are replaced whole (written beside, then renamed), so a crash never leaves half of one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tqdm

from dga_jax.errors import InputError
from dga_jax.eval.engine import Engine
from dga_jax.eval.task import (
    Example,
    Problems,
    Summary,
    Task,
    json_line,
    json_text,
    replace_text,
)


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The records of a task's JSONL by id; unreadable lines (a crash's last, maybe cut inside
    a multi-byte character) are ignored."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and "id" in record:
                records[str(record["id"])] = record
    return records


def run_task(
    task: Task,
    engine: Engine,
    out_dir: Path,
    *,
    chunk: int = 32,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> tuple[Summary, Problems, int]:
    """Evaluates the task's pending examples, then summarises all its records. `info` (the
    checkpoint, attention... of the run) joins the settings the records must share.

    Returns (summary, problems, examples evaluated now)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 example, got {chunk}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task.name}.jsonl"
    settings_path = out_dir / f"{task.name}.settings.json"
    settings = run_settings(task, engine, info)
    done = read_records(path)
    if done:
        check_settings(settings_path, settings, path)
    problems = Problems()
    pending = list(task.examples(engine, problems, done))
    pending.sort(key=_length, reverse=True)
    replace_text(settings_path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    _drop_partial_line(path)
    with (
        open(path, "a", encoding="utf-8") as f,
        tqdm.tqdm(total=len(pending), desc=task.name, unit="example", disable=not progress) as bar,
    ):
        for first in range(0, len(pending), chunk):
            for record in task.evaluate(engine, pending[first : first + chunk]):
                f.write(json_line(record))
            f.flush()
            bar.update(min(chunk, len(pending) - first))
    records = list(read_records(path).values())
    return task.summarize(records, out_dir), problems, len(pending)


def run_settings(task: Task, engine: Engine, info: dict[str, Any] | None) -> dict[str, Any]:
    """What the records of a run of `task` depend on beyond their ids, as JSON reads it back."""
    settings = {"task": task.settings(), "max_length": engine.max_length, "run": info or {}}
    return json.loads(json.dumps(settings))


def check_settings(path: Path, settings: dict[str, Any], records: Path) -> None:
    """Raises InputError unless the settings stored at `path` equal `settings`: the records
    in `records` are to be resumed with them."""
    if not path.exists():
        raise InputError(
            f"{records} holds records but {path} is missing, so their settings are unknown "
            "(written before settings were kept?): move the records away to start over, or "
            f"write these settings there to resume: {json.dumps(settings)}"
        )
    try:
        stored = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not the JSON of a task's settings: {e}") from e
    changed = [f"{key} {old!r} -> {new!r}" for key, old, new in _differences(stored, settings)]
    if changed:
        raise InputError(
            f"{path}: the records in {records} were made with other settings "
            f"({'; '.join(changed)}); write to another output directory, or move those "
            "records away to start over"
        )


def _differences(old: Any, new: Any, key: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of each leaf that differs between two JSON trees
    (a missing key reads as None)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(old.keys() | new.keys()):
            inner = f"{key}.{name}" if key else name
            yield from _differences(old.get(name), new.get(name), inner)
    elif old != new:
        yield key, old, new


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
        result, problems, now = run_task(
            task, engine, out_dir, chunk=chunk, progress=progress, info=info
        )
        summary["tasks"][task.name] = {
            "metrics": result.metrics,
            "skipped": problems.report(),
            "files": result.files,
            "headline": result.headline,
            "evaluated_now": now,
        }
        sections.append(_section(task.name, result, problems))
    replace_text(out_dir / "summary.json", json_text(summary))
    header = "".join(f"- {k}: {v}\n" for k, v in (info or {}).items())
    replace_text(out_dir / "results.md", header + "\n" + "\n\n".join(sections) + "\n")
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
