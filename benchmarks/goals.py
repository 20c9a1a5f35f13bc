"""The attention core's speed goals, each measured over several runs in processes of its own.

    python benchmarks/goals.py                       # 5 runs of each goal: ~45 min on 2 cores
    python benchmarks/goals.py --runs 3 --goals train16
    python benchmarks/goals.py --quick               # 1K and 2K, one run: the plumbing

A goal is the ratio dense / DGA of one benchmark script's medians (`attention.py`,
`model_forward.py`, `train_step.py`: DGA's XLA path against dense blockwise attention, float32
on CPU, streaming selection unless `--selection`), at the shapes the goal names. Each run of a
goal is one process of its script, and the goals take turns round by round, so a slow phase of
the machine hits them alike. On a 2-core host a single run's ratio moves by about +-15% (both
variants' times move, independently: RESULTS.md, "The goals' spread over one session"), so a
goal is judged on the median of its runs; the table lists every run's ratio, the median, and
how many runs reached the goal. The runs get glibc's malloc tunables (RESULTS.md, "Page
faults") unless GLIBC_TUNABLES is set already. Writes `benchmarks/results/goals_<backend>
[_quick].json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import environment, length_label, out_dir, positive_float, positive_int

HERE = Path(__file__).resolve().parent
TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=137438953472"
)
DGA, DENSE = "dga_xla", "dense_blockwise"


@dataclasses.dataclass(frozen=True)
class Goal:
    """One goal: `script` at `length` (and `mode`, for attention.py) must run DGA at least
    `target` times as fast as dense."""

    key: str
    name: str
    target: float
    script: str
    length: int
    quick_length: int
    repeats: int
    mode: str | None = None

    def at(self, quick: bool) -> int:
        """The sequence length it is measured at."""
        return self.quick_length if quick else self.length

    def command(self, args: argparse.Namespace, out: Path) -> list[str]:
        """The script's command line for one run, writing its JSON into `out`."""
        length = self.at(args.quick)
        repeats = 2 if args.quick else self.repeats
        flags = ["--lengths", str(length), "--repeats", str(repeats)]
        flags += ["--selection", args.selection, "--out", str(out)]
        if self.mode:  # attention.py
            flags += ["--modes", self.mode, "--impls", f"{DGA},{DENSE}", "--max-seconds", "1e9"]
        else:
            flags += ["--variants", f"{DGA},{DENSE}"]
        return [sys.executable, str(HERE / self.script), *flags]


GOALS = (
    Goal("attn16_fwd", "attention forward", 4.0, "attention.py", 16384, 1024, 5, "fwd"),
    Goal("attn32_fwd", "attention forward", 4.5, "attention.py", 32768, 2048, 3, "fwd"),
    Goal("attn32_bwd", "attention fwd+bwd", 4.0, "attention.py", 32768, 2048, 3, "fwd+bwd"),
    Goal("model16", "tiny model forward", 3.0, "model_forward.py", 16384, 1024, 5),
    Goal("train16", "tiny train step", 3.5, "train_step.py", 16384, 1024, 5),
)
BY_KEY = {goal.key: goal for goal in GOALS}


def ratio(records: list[dict], mode: str | None) -> float | None:
    """dense / DGA median time from one script's records (None where either did not run)."""
    medians = {}
    for record in records:
        if mode is not None and record.get("mode") != mode:
            continue
        name = record.get("impl", record.get("variant"))
        if record.get("status") == "ok" and name in (DGA, DENSE):
            medians[name] = record["median_ms"]
    if len(medians) < 2:
        return None
    return medians[DENSE] / medians[DGA]


def run_once(goal: Goal, args: argparse.Namespace, env: dict[str, str]) -> float | None:
    """One run of `goal` in its own process: its ratio, None if it failed (why: on stderr)."""
    with tempfile.TemporaryDirectory() as out:
        try:
            done = subprocess.run(
                goal.command(args, Path(out)),
                capture_output=True,
                text=True,
                cwd=HERE.parent,
                env=env,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            return _failed(goal, f"no result within --timeout {args.timeout:g} s")
        results = list(Path(out).glob("*.json"))
        if done.returncode or len(results) != 1:
            return _failed(goal, f"exit code {done.returncode}\n{done.stderr[-2000:]}")
        records = json.loads(results[0].read_text())["records"]
        found = ratio(records, goal.mode)
        if found is None:
            reasons = [_why(record) for record in records if record.get("status") != "ok"]
            return _failed(goal, "; ".join(reasons) or "no DGA or dense record")
        return found


def _why(record: dict) -> str:
    """A record that did not run, and why: attention.py's status and reason, or a model
    script's status ("failed: <error>")."""
    said = f"{record.get('impl', record.get('variant'))}: {record.get('status')}"
    return said if record.get("reason") is None else f"{said} {record['reason']}"


def _failed(goal: Goal, why: str) -> None:
    print(f"{goal.key}: run failed: {why}", file=sys.stderr, flush=True)


def summary(goal: Goal, ratios: list[float | None], quick: bool) -> dict:
    """A goal's record: every run's ratio, their median, and how many reached the target."""
    done = [r for r in ratios if r is not None]
    median = statistics.median(done) if done else None
    met = sum(r >= goal.target for r in done)
    return dict(
        goal=goal.key,
        name=goal.name,
        length=goal.at(quick),
        target=goal.target,
        ratios=ratios,
        median=median,
        runs_met=met,
        # on the median of a majority of runs: one run that succeeded is not a verdict
        met=2 * len(done) > len(ratios) and median >= goal.target,
    )


def table(records: list[dict]) -> str:
    """The goals' table: target, each run's ratio, median, runs that met the target."""
    header = f"{'goal':<22}{'L':>7}{'target':>8}  {'runs: dense / DGA':<34}{'median':>8}"
    lines = [header + f"{'runs met':>10}"]
    for r in records:
        runs = " ".join("failed" if x is None else f"{x:.2f}" for x in r["ratios"])
        median = "-" if r["median"] is None else f"{r['median']:.2f}x"
        met = f"{r['runs_met']}/{len(r['ratios'])}"
        row = f"{r['name']:<22}{length_label(r['length']):>7}{r['target']:>7.1f}x  {runs:<34}"
        lines.append(row + f"{median:>8}{met:>10}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1K / 2K shapes, 1 run")
    parser.add_argument("--runs", type=positive_int, default=None, help="per goal (default 5)")
    parser.add_argument(
        "--goals", default=",".join(BY_KEY), help="comma list of " + ",".join(BY_KEY)
    )
    parser.add_argument("--selection", choices=("streaming", "global"), default="streaming")
    parser.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per run")
    parser.add_argument("--out", type=out_dir, default=HERE / "results")
    args = parser.parse_args(argv)
    keys = args.goals.split(",")
    unknown = [key for key in keys if key not in BY_KEY]
    if unknown or len(set(keys)) < len(keys):
        parser.error(f"--goals {args.goals}: name each of {list(BY_KEY)} at most once")
    args.runs = args.runs or (1 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    goals = [BY_KEY[key] for key in args.goals.split(",")]
    env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", TUNABLES)}
    ratios: dict[str, list[float | None]] = {goal.key: [] for goal in goals}
    for number in range(args.runs):
        for goal in goals:
            ratios[goal.key].append(run_once(goal, args, env))
            done = ratios[goal.key][-1]
            said = "failed" if done is None else f"{done:.2f}x"
            print(f"run {number + 1}/{args.runs}, {goal.name}: {said}", flush=True)
    records = [summary(goal, ratios[goal.key], args.quick) for goal in goals]
    print(f"\n{args.selection} selection, median over {args.runs} run(s) of each\n{table(records)}")
    info = environment()
    info["host_malloc"]["GLIBC_TUNABLES"] = env["GLIBC_TUNABLES"]  # the runs'
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"goals_{info['backend']}{'_quick' if args.quick else ''}.json"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(
        json.dumps(dict(config=config, environment=info, goals=records), indent=2) + "\n"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
