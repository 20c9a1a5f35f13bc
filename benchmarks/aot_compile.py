"""Compile for TPUs and GPUs without them: what compiles where, memory per device, registers.

    JAX_PLATFORMS=cpu .venv-aot/bin/python benchmarks/aot_compile.py   # ~25 min on 2 cores
    JAX_PLATFORMS=cpu .venv-aot/bin/python benchmarks/aot_compile.py --targets h100 \\
        --lengths 2048 --blocks 64x64,128x128 --tiny-lengths '' --recipes '' --long-recipes '' \\
        --expect-failures

(`make aot` builds `.venv-aot` with the `aot` extra.) Real compilers run (`dga_jax.aot`):
Mosaic and XLA:TPU from libtpu for v4, v5e, v5p, v6e topologies; XLA:GPU with Triton and ptxas
for H100 and H200 target descriptions. For each target it compiles the DGA kernels (forward and
gradient, both selections) at each length and block size, the tiny model's train step on 4
devices (data 2 x tensor 2), the LLaMA2-7B train step of `configs/llama7b_dga.py` (8K,
FSDP over 8 chips) with the target's kernels, and the same step at 128K with the sequence
split over the chips under each context-parallel strategy. A block size that cannot fit is
rejected before compiling (`rejected`). Prints a table; writes aot_compile.json and
aot_compile.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; targets are topologies

import jax
from block_args import blocks_label, parse_blocks
from common import environment, out_dir, positive_int, positive_ints, positive_ints_or_none

from dga_jax import aot
from dga_jax.model.config import REMAT_POLICIES
from dga_jax.ops.dga.config import SELECTIONS
from dga_jax.ops.dga.sharded import STRATEGIES
from dga_jax.ops.tiles import BlockSizes

sys.path.insert(0, str(Path(__file__).parents[1]))  # `train/` and `configs/` are the repo's
from configs import llama7b_dga, tiny_dga  # noqa: E402
from train.config import INPUTS, from_config_dict  # noqa: E402
from train.setup import lower_train_step  # noqa: E402

IMPLEMENTATION = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}
REJECTED = "use smaller blocks"  # the on-chip memory checks' advice: tiles that cannot fit


def main() -> int:
    args = _parse_args()
    reports = []

    def keep(new: list[aot.CompileReport]) -> None:  # written as they come: nothing is lost
        reports.extend(new)
        _write(reports, args.out)

    for target in args.targets:
        keep(_kernels(target, args))
        keep([_tiny_step(target, seq_len) for seq_len in args.tiny_lengths])
    keep([_recipe_step(target, chips) for target, chips in args.recipes])
    for target, chips, strategy, remat in args.long_recipes:
        keep([_long_step(target, chips, strategy, remat, args.long_length)])
    print(_markdown(reports))
    failed = [r for r in reports if not r.ok and not r.label.startswith("rejected")]
    print(f"{len(reports) - len(failed)}/{len(reports)} ok or rejected before compiling")
    return 1 if failed and not args.expect_failures else 0


def _kernels(target: str, args) -> list[aot.CompileReport]:
    """Each kernel forward and gradient, per selection, length and block size."""
    platform = aot.TARGETS[target].platform
    devices = aot.target_devices(target, chips=1 if platform == "gpu" else 4)
    reports = []
    for blocks in args.blocks or [None]:
        for seq_len in args.lengths:
            for selection in args.selections:
                for gradient in (False, True):
                    name = "grad" if gradient else "fwd"
                    tiles = blocks_label(blocks)
                    label = f"kernels {name} {selection} L={seq_len} blocks={tiles}"
                    try:
                        lowered = aot.lower_attention(
                            devices,
                            seq_len=seq_len,
                            implementation=IMPLEMENTATION[platform],
                            selection=selection,
                            gradient=gradient,
                            block_sizes=blocks,
                        )
                    except ValueError as error:
                        if REJECTED not in str(error):
                            raise
                        reports.append(_rejected(label, target, error))  # cannot fit
                        continue
                    reports.append(_report(label, lowered, target))
    return reports


def _tiny_step(target: str, seq_len: int) -> aot.CompileReport:
    config = tiny_dga.get_config()
    config.model.overrides.attention_impl = IMPLEMENTATION[aot.TARGETS[target].platform]
    config.model.overrides.dtype = "bfloat16"
    config.data.seq_len = seq_len
    config.mesh.update(data=2, fsdp=1, seq=1, tensor=2)
    lowered = lower_train_step(from_config_dict(config), aot.target_devices(target, chips=4))
    return _report(f"tiny train step L={seq_len} B=8 on 4 (data 2 x tensor 2)", lowered, target)


def _recipe_step(target: str, chips: int) -> aot.CompileReport:
    config = llama7b_dga.get_config()
    implementation = IMPLEMENTATION[aot.TARGETS[target].platform]
    config.model.overrides.attention_impl = implementation
    # Weights and data are never read: the step is lowered from shapes.
    config.update_from_flattened_dict(dict.fromkeys(INPUTS, "compile only"))
    devices = aot.target_devices(target, chips=chips)
    lowered = lower_train_step(from_config_dict(config), devices)
    label = f"llama7b_dga train step L=8192 B=64 (8 x 8 accum) FSDP on {chips}, {implementation}"
    return _report(label, lowered, target)


def _long_step(
    target: str, chips: int, strategy: str, remat: str | None, seq_len: int
) -> aot.CompileReport:
    """The LLaMA2-7B step at `seq_len` with the sequence split over all chips (mesh seq =
    chips): one sequence per micro-batch, 8 micro-batches, weights over (fsdp, seq); `remat`
    replaces the recipe's policy."""
    config = llama7b_dga.get_config()
    implementation = IMPLEMENTATION[aot.TARGETS[target].platform]
    config.model.overrides.update(attention_impl=implementation, max_position=seq_len)
    if remat:
        config.model.overrides.remat = remat
    config.update_from_flattened_dict(dict.fromkeys(INPUTS, "compile only"))
    config.data.seq_len = seq_len
    config.train.global_batch_size = 8
    config.mesh.update(data=1, fsdp=1, seq=chips, tensor=1, context_parallel=strategy)
    lowered = lower_train_step(from_config_dict(config), aot.target_devices(target, chips=chips))
    label = (
        f"llama7b_dga train step L={seq_len} B=8 (8 x 1 accum), sequence over {chips} "
        f"({strategy}), {implementation}" + (f", remat {remat}" if remat else "")
    )
    return _report(label, lowered, target)


def _report(label: str, lowered, target: str) -> aot.CompileReport:
    report = aot.compile_report(label, lowered, target)
    print(report, flush=True)
    return report


def _rejected(label: str, target: str, error: Exception) -> aot.CompileReport:
    report = aot.CompileReport(f"rejected {label}", target, False, 0.0, error=str(error))
    print(report, flush=True)
    return report


def _write(reports: list[aot.CompileReport], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": {**environment(), "backend": "cpu host, compile-only target devices"},
        "reports": [dataclasses.asdict(r) for r in reports],
    }
    _replace(out / "aot_compile.json", json.dumps(payload, indent=1) + "\n")
    _replace(out / "aot_compile.md", _markdown(reports))


def _replace(path: Path, text: str) -> None:
    """Writes `path` whole or not at all: an interrupted run (Ctrl-C in a half-hour matrix, a
    full disk) leaves the previous results, never a truncated file."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _markdown(reports: list[aot.CompileReport]) -> str:
    rows = [
        "| target | what | status | compile s | peak MiB / device | of MiB "
        "| kernels (smem B / registers / spill B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        status = "ok" if r.ok else ("rejected" if r.label.startswith("rejected") else "FAIL")
        mib = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:,.1f}"
        capacity = "" if r.device_memory_bytes is None else f"{r.device_memory_bytes / 2**20:,.0f}"
        kernels = "; ".join(
            f"{k.name.removeprefix('interval_')} "
            f"{k.shared_memory_bytes:,}/{k.registers}/{k.spill_bytes}"
            for k in r.kernels
        )
        what = r.label.removeprefix("rejected ")
        rows.append(
            f"| {r.target} | {what} | {status} | {r.seconds:.1f} | {mib} | {capacity} | {kernels} |"
        )
    return "\n".join(rows) + "\n"


def _strings(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _selections(text: str) -> list[str]:
    """argparse type: a comma list of DGA selection rules."""
    unknown = [x for x in _strings(text) if x not in SELECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown selections {unknown}; choose from {SELECTIONS}")
    return _strings(text)


def _fields(item: str, form: str, counts: tuple[int, ...]) -> list[str]:
    """`item` split at ':' into one of `counts` fields, else an argparse error showing `form`."""
    fields = item.split(":")
    if len(fields) not in counts:
        raise argparse.ArgumentTypeError(f"{item!r} is not {form}")
    return fields


def _recipes(text: str) -> list[tuple[str, int]]:
    """argparse type: TARGET:CHIPS,..."""
    pairs = [_fields(item, "TARGET:CHIPS", (2,)) for item in _strings(text)]
    return [(target, positive_int(chips)) for target, chips in pairs]


def _long_recipes(text: str) -> list[tuple[str, int, str, str | None]]:
    """argparse type: TARGET:CHIPS:STRATEGY[:REMAT],..."""
    form = "TARGET:CHIPS:STRATEGY[:REMAT]"
    recipes = []
    for item in _strings(text):
        target, chips, strategy, remat = [*_fields(item, form, (3, 4)), None][:4]
        if strategy not in STRATEGIES:
            raise argparse.ArgumentTypeError(f"{item!r}: strategy must be one of {STRATEGIES}")
        if remat and remat not in REMAT_POLICIES:
            raise argparse.ArgumentTypeError(f"{item!r}: remat must be one of {REMAT_POLICIES}")
        recipes.append((target, positive_int(chips), strategy, remat or None))
    return recipes


def _blocks(text: str) -> list[BlockSizes]:
    """argparse type: QxK[wW][sS],... (`block_args`)"""
    blocks = []
    for item in _strings(text):
        try:
            parsed = parse_blocks(item)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{item!r}: {error}") from None
        if parsed is None:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not QxK[wW][sS] (e.g. 64x64, 128x64w4s3)"
            )
        blocks.append(parsed)
    return blocks


def _parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(aot.TARGETS), type=_strings)
    p.add_argument("--lengths", default="2048,32768,131072", type=positive_ints)
    p.add_argument("--selections", default=",".join(SELECTIONS), type=_selections)
    p.add_argument(
        "--blocks",
        type=_blocks,
        help="QxK[wW][sS],... block sizes and Triton launch (default: each backend's defaults)",
    )
    p.add_argument(
        "--tiny-lengths",
        default="2048,32768",
        type=positive_ints_or_none,
        help="the tiny model's train step at these lengths ('' for none)",
    )
    p.add_argument(
        "--recipes",
        default="v5p:4,v5p:8,h100:8,h200:8",
        type=_recipes,
        help="TARGET:CHIPS,... for the LLaMA2-7B train step ('' for none): v5p:4 is a v5p-8",
    )
    p.add_argument(
        "--long-recipes",
        default="v5p:4:dga,v5p:4:dga:full,v5p:8:ulysses,v5p:8:dga,h100:8:ulysses,h100:8:dga",
        type=_long_recipes,
        help="TARGET:CHIPS:STRATEGY[:REMAT],... for the 7B step at --long-length, sequence over"
        " CHIPS",
    )
    p.add_argument("--long-length", default=131072, type=positive_int)
    p.add_argument(
        "--expect-failures",
        action="store_true",
        help="exit 0 even if a compile fails (exploring block sizes)",
    )
    p.add_argument("--out", type=out_dir, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    named = set(args.targets) | {t for t, _ in args.recipes} | {t for t, *_ in args.long_recipes}
    unknown = sorted(named - set(aot.TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}; choose from {sorted(aot.TARGETS)}")
    for target, chips, *_ in args.recipes + args.long_recipes:
        try:
            aot.check_target(target, chips)
        except ValueError as error:
            p.error(f"--recipes / --long-recipes: {error}")
    if jax.default_backend() != "cpu":
        p.error("run with JAX_PLATFORMS=cpu: the host compiles, the targets are topologies")
    return args


if __name__ == "__main__":
    sys.exit(main())
