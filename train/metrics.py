"""What the user sees: a progress bar, metrics in JSONL and TensorBoard, a loss plot, a summary.

`metrics.jsonl` is strict JSON, one object per line. A non-finite value (a diverged loss, an
infinite gradient norm) is written as `null`, and the record's `nonfinite` object keeps what it
was, as Python spells it: `{"step": 7, "loss": null, "nonfinite": {"loss": "nan"}}` (jq:
`.nonfinite.loss`; pandas: `pd.json_normalize` gives a `nonfinite.loss` column). `read_metrics`
turns them back into floats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import tqdm

from dga_jax.errors import InputError

# The values a run's summary reports, carried over from metrics.jsonl on resume.
LAST_KEYS = ("loss", "val_loss", "tokens_per_s")
# What an evaluation logs.
VALIDATION_KEYS = ("val_loss", "val_perplexity")


# bf16 dense peak per device, for the MFU estimate when the config does not give one.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device_kind: str, configured: float) -> float | None:
    """Configured peak FLOP/s per device, else a guess from the device kind (its longest
    matching `PEAK_FLOPS` name: "TPU v5 lite" is not "TPU v5"), else None."""
    if configured > 0:
        return configured
    matches = [k for k in PEAK_FLOPS if k.lower() in device_kind.lower()]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


class MetricsLog:
    """Appends one JSON object per record to `metrics.jsonl`; mirrors scalars to TensorBoard.

    On resume, records after the restored step are dropped, so the file reads as one run (with
    `eval_owed`, the restored step's evaluation, which the run logs again, too), and `last`
    holds the last logged `LAST_KEYS` (empty on a fresh run or another host).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        resume_step: int,
        eval_owed: bool = False,
        enabled: bool = True,
        wandb_project: str = "",
        run_config: dict[str, Any] | None = None,
    ):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        self.last: dict[str, float] = {}
        if not enabled:
            return
        # The file first: a damaged one stops the run before a W&B run or a writer is opened.
        kept = _kept_records(read_metrics(self.path), resume_step, eval_owed)
        _replace(self.path, "".join(_encode(r) + "\n" for r in kept))
        for record in kept:
            self.last.update({key: record[key] for key in LAST_KEYS if key in record})
        if wandb_project:
            self.wandb = _start_wandb(wandb_project, Path(workdir), run_config or {})
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.info("tensorboardX not installed: metrics go to %s only", self.path)
        else:
            # TensorBoard hides the earlier runs' events after the restored step, as
            # metrics.jsonl drops their records (else the curves overlap there); on a fresh
            # start (step 0: the loop logs steps from 1), all of them, a crashed first run's.
            self.tensorboard = SummaryWriter(
                str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1
            )

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(_encode(record) + "\n")
        scalars = {
            k: v for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)
        }
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _kept_records(
    records: list[dict[str, Any]], resume_step: int, eval_owed: bool
) -> list[dict[str, Any]]:
    """The `records` up to `resume_step`; with `eval_owed`, less the `VALIDATION_KEYS` at it (an
    earlier rerun may have logged the evaluation, then died before its next checkpoint)."""
    kept = []
    for record in records:
        if eval_owed and record["step"] == resume_step:
            record = {k: v for k, v in record.items() if k not in VALIDATION_KEYS}
        if record["step"] <= resume_step and len(record) > 1:  # more than its step
            kept.append(record)
    return kept


def _start_wandb(project: str, workdir: Path, run_config: dict[str, Any]):
    """A W&B run resumed by workdir name, or None (with a warning) if wandb is not installed."""
    try:
        import wandb
    except ImportError:
        logging.warning(
            "config.train.wandb_project is set but wandb is not installed: pip install wandb"
        )
        return None
    run_id = hashlib.sha1(str(workdir.absolute()).encode()).hexdigest()[:16]  # one per workdir
    return wandb.init(
        project=project,
        name=workdir.name,
        id=run_id,
        resume="allow",
        config=run_config,
        dir=str(workdir),
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of `path` (none if it is absent).

    A last line with no newline that does not read, what a run killed while appending (or a full
    disk) leaves, is dropped with a warning. Any other unreadable line is damage, or the file is
    not a run's metrics: an `InputError` naming the file and the line, which leaves the file as it
    is (resuming rewrites it without the dropped records).
    """
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    except OSError as error:  # a directory, no permission
        raise InputError(f"cannot read the metrics file {path}: {error}") from error
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_record(line)
        if record is not None:
            records.append(record)
        elif number < len(lines):  # a whole line (a newline ends it): no run writes that
            raise InputError(
                f"{path} line {number} is not a metrics record (a JSON object with an integer "
                f'"step"): the file is damaged or not a run\'s metrics; repair or delete line '
                f"{number}, or move the file away, to go on"
            )
        else:
            logging.warning(
                "%s: line %d cut short (a run stopped while writing it): dropped", path, number
            )
    return records


def _parse_record(line: str) -> dict[str, Any] | None:
    """One line's record, or None if it is not a JSON object with an int `step`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
        return _decode(record)
    return None


def _encode(record: dict[str, Any]) -> str:
    """`record` as strict JSON: its non-finite floats null, and named in `nonfinite`."""
    nonfinite = {
        k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)
    }
    if nonfinite:
        record = {**record, **dict.fromkeys(nonfinite), "nonfinite": nonfinite}
    return json.dumps(record, allow_nan=False)


def _decode(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record `_encode` wrote: the values named in `nonfinite` as floats again; None if
    `nonfinite` is not what `_encode` writes (a damaged line). (Files written before carry NaN
    and Infinity literals, which `json.loads` reads as they are.)"""
    nonfinite = record.pop("nonfinite", {})
    if not isinstance(nonfinite, dict):
        return None
    try:
        values = {k: float(v) for k, v in nonfinite.items() if isinstance(v, str)}
    except ValueError:  # not "nan", "inf" or "-inf"
        return None
    if len(values) != len(nonfinite) or any(math.isfinite(v) for v in values.values()):
        return None
    return {**record, **values}


def _replace(path: Path, text: str) -> None:
    """Writes `text` to `path` in one step: a crash leaves the old file or the new one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


class Progress:
    """A tqdm bar with step, loss, tokens/s and ETA (to stderr; quiet on other hosts)."""

    def __init__(self, total: int, start: int, *, enabled: bool):
        self.bar = tqdm.tqdm(
            total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def update(self, steps: int, loss: float, tokens_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Train and validation loss against step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if key == "val_loss" else None, label=label)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=Path(out).parent.name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=110)
