"""Context parallelism: per-device memory and collective bytes as the sequence splits P ways.

    .venv/bin/python benchmarks/context_parallel.py                 # ~10 min on 2 cores
    .venv/bin/python benchmarks/context_parallel.py --lengths 8192 --parts 1,8 --steps ''
    .venv-aot/bin/python benchmarks/context_parallel.py --target h100 --steps ''

Everything is compiled, nothing runs: on P fake CPU devices (8, set before JAX starts), or on
the compile-only devices of a TPU or GPU target (`--target`, `dga_jax.aot`; needs the aot
extra), each strategy ("ulysses", "dga") is lowered from abstract inputs and the compiler reports
per-device memory (`memory_analysis()`) and the collectives of its optimized HLO
(`dga_jax.compile_stats.collectives`). XLA:CPU runs bfloat16 collectives in float32, so on CPU their
bytes are twice what a TPU or GPU moves: take collective bytes from a --target run.

- attention: LLaMA2-7B's per-layer shape (32 query and KV heads of 128, bfloat16, one sequence)
  forward + backward at each length, dense (all-gather K/V under "dga") and DGA (m=16,
  gamma=0.1, global selection);
- train step: the tiny DGA model's whole train step (`lower_train_step`) at each --steps length
  on a (1, 1, P, 1) mesh.

Collective bytes are the result sizes of each collective in the HLO per device; a ratio to the
full K/V (both, all heads) says how far from gathering the sequence a strategy stays. Fake CPU
devices say nothing about speed: no time is reported. Writes context_parallel.json, .md and
.png to --out.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import (  # noqa: E402
    environment,
    length_label,
    out_dir,
    positive_ints,
    positive_ints_or_none,
)

from dga_jax import aot  # noqa: E402
from dga_jax.compile_stats import collectives, xla_peak_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))  # `train/` and `configs/` are the repo's
from configs import tiny_dga  # noqa: E402
from train.config import from_config_dict  # noqa: E402
from train.setup import lower_train_step  # noqa: E402

MIB = 2**20
LLAMA = dict(heads=32, kv_heads=32, head_dim=128, dtype=jnp.bfloat16)
STRATEGIES = ("ulysses", "dga")
TARGET_CHIPS = 8  # compile-only devices of a --target


@dataclasses.dataclass(frozen=True)
class Row:
    """One compile: what was lowered, on how many sequence parts, and what XLA reports."""

    what: str  # "attention dense", "attention dga", "train step"
    strategy: str
    seq_len: int
    parts: int
    temp_mib: float
    peak_mib: float
    collective_mib: float
    kv_ratio: float | None  # collective bytes / full K and V bytes (attention rows; None else)
    collectives: str  # ops and counts


def main() -> int:
    args = _parse_args()
    devices = (
        jax.devices()
        if args.target == "cpu"
        else aot.target_devices(args.target, chips=TARGET_CHIPS)
    )
    name = "context_parallel" + ("" if args.target == "cpu" else f"_{args.target}")
    rows: list[Row] = []
    for seq_len in args.lengths:
        for attention in ("dense", "dga"):
            for strategy in STRATEGIES:
                for parts in args.parts:
                    rows.append(_attention(devices, attention, strategy, seq_len, parts))
                    _write(rows, args.out / name)
    for seq_len in args.steps:
        for strategy in STRATEGIES:
            for parts in args.parts:
                if strategy == "ulysses" and parts > 2:
                    continue  # the tiny model's 2 KV heads split at most 2 ways
                rows.append(_train_step(devices, strategy, seq_len, parts))
                _write(rows, args.out / name)
    print(_markdown(rows))
    return 0


def _attention(devices, attention: str, strategy: str, seq_len: int, parts: int) -> Row:
    lowered = aot.lower_context_attention(
        devices,
        (1, 1, parts, 1),
        strategy=strategy,
        attention=attention,
        implementation="blockwise" if attention == "dense" else None,
        seq_len=seq_len,
        **LLAMA,
    )
    kv_bytes = 2 * seq_len * LLAMA["kv_heads"] * LLAMA["head_dim"] * 2
    return _row(f"attention {attention}", strategy, seq_len, parts, lowered.compile(), kv_bytes)


def _train_step(devices, strategy: str, seq_len: int, parts: int) -> Row:
    config = tiny_dga.get_config()
    config.data.seq_len = seq_len
    config.train.global_batch_size = 1
    config.mesh.update(data=1, fsdp=1, seq=parts, tensor=1, context_parallel=strategy)
    lowered = lower_train_step(from_config_dict(config), devices[:parts])
    return _row("train step tiny_dga", strategy, seq_len, parts, lowered.compile(), None)


def _row(what, strategy, seq_len, parts, compiled, kv_bytes) -> Row:
    found = collectives(compiled) if parts > 1 else []
    moved = sum(c.bytes for c in found)
    ops = sorted({c.op for c in found})
    counts = ", ".join(f"{sum(c.op == op for c in found)} {op}" for op in ops)
    row = Row(
        what,
        strategy,
        seq_len,
        parts,
        compiled.memory_analysis().temp_size_in_bytes / MIB,
        xla_peak_bytes(compiled) / MIB,
        moved / MIB,
        moved / kv_bytes if kv_bytes else None,  # JSON null: NaN is not JSON
        counts,
    )
    print(row, flush=True)
    return row


def _markdown(rows: list[Row]) -> str:
    base = {(r.what, r.strategy, r.seq_len): r for r in rows if r.parts == 1}
    lines = [
        "| what | strategy | L | P | temp MiB | x P=1 | peak MiB | collectives MiB | / K+V |"
        " collectives |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one = base.get((r.what, r.strategy, r.seq_len))
        ratio = f"{r.temp_mib / one.temp_mib:.3f}" if one and one.temp_mib else ""
        kv_ratio = "" if r.kv_ratio is None else f"{r.kv_ratio:.3f}"
        lines.append(
            f"| {r.what} | {r.strategy} | {r.seq_len:,} | {r.parts} | {r.temp_mib:,.1f} | "
            f"{ratio} | {r.peak_mib:,.1f} | {r.collective_mib:,.1f} | {kv_ratio} | "
            f"{r.collectives} |"
        )
    return "\n".join(lines)


def _write(rows: list[Row], stem: Path) -> None:
    """Results so far (a killed run keeps what it measured): `stem`.json, .md and .png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    record = {"environment": environment(), "rows": [dataclasses.asdict(r) for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".md").write_text(_markdown(rows) + "\n")
    _plot(rows, stem.with_suffix(".png"))


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r.what, r.strategy, r.seq_len) for r in rows})
    for what, strategy, seq_len in series:
        mine = sorted(
            (r for r in rows if (r.what, r.strategy, r.seq_len) == (what, strategy, seq_len)),
            key=lambda r: r.parts,
        )
        label = f"{what}, {strategy}, L={length_label(seq_len)}"
        axes[0].plot([r.parts for r in mine], [r.temp_mib for r in mine], "o-", label=label)
        axes[1].plot([r.parts for r in mine], [r.collective_mib for r in mine], "o-", label=label)
    for ax, title in zip(
        axes, ("temp memory per device (MiB)", "collective bytes per device (MiB)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence parts P")
        ax.set_title(title)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=positive_ints, default=[8192, 32768, 131072])
    parser.add_argument("--parts", type=positive_ints, default=[1, 2, 4, 8])
    parser.add_argument(
        "--steps",
        type=positive_ints_or_none,
        default=[8192],
        help="train-step lengths ('' for none)",
    )
    parser.add_argument(
        "--target", default="cpu", help="cpu (fake devices) or a dga_jax.aot target: h100, v5p, ..."
    )
    parser.add_argument("--out", type=out_dir, default=Path("benchmarks/results"))
    args = parser.parse_args()
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` for a target, part count or length no compile could take, before any runs
    (each would end the run with a traceback part-way)."""
    if args.target != "cpu" and args.target not in aot.TARGETS:
        parser.error(f"--target {args.target!r}: choose cpu or one of {', '.join(aot.TARGETS)}")
    devices = len(jax.devices()) if args.target == "cpu" else TARGET_CHIPS
    if max(args.parts) > devices:
        parser.error(f"--parts {max(args.parts)}: more than the {devices} devices compiled for")
    for flag, lengths in (("--lengths", args.lengths), ("--steps", args.steps)):
        uneven = [(n, p) for n in lengths for p in args.parts if n % p]
        if uneven:
            n, p = uneven[0]
            parser.error(f"{flag} {n}: not a multiple of --parts {p} (each part holds L / P)")


if __name__ == "__main__":
    raise SystemExit(main())
