"""The model-level benchmarks' variants (`model_forward.py`, `train_step.py`, `prefill.py`): a
preset with one attention and implementation each, their shared flags, and timing them in turns
at every length (`run_variants`; `--breakdown` traces one call each by scope, `trace_scopes.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import jax
from common import (
    GIB,
    Calls,
    add_dga_args,
    check_dga_args,
    environment,
    failed_record,
    fit_record,
    length_label,
    out_dir,
    positive_int,
    positive_ints,
    timed_record,
    write_results,
)
from trace_scopes import print_scopes, scope_ms

from dga_jax import DGAConfig, ModelConfig
from dga_jax.model.config import PRESETS

# Model-level benchmark variants: name -> (ModelConfig.attention, ModelConfig.attention_impl).
VARIANTS = {
    "dga_xla": ("dga", "xla"),
    "dga_pallas_gpu": ("dga", "pallas_gpu"),
    "dga_pallas_tpu": ("dga", "pallas_tpu"),
    "dense_xla": ("dense", "xla"),
    "dense_blockwise": ("dense", "blockwise"),
    "dense_cudnn": ("dense", "cudnn"),
}
DEFAULT_VARIANTS = "dga_xla,dense_xla,dense_blockwise"  # what runs on any backend (CPU)


def report_variants(records: list[dict]) -> None:
    """Prints L, variant, median ms, tokens/s, DGA's speedup and XLA peak per record: the
    speedup is this record's time over that of the first DGA variant timed at the same L."""
    print(
        f"{'L':>6}  {'variant':<16}{'median ms':>11}{'tokens/s':>11}{'DGA speedup':>13}"
        f"{'XLA peak GiB':>14}  status"
    )
    dga = {}  # L -> (variant, ms) of the first DGA variant timed there
    for r in records:
        if VARIANTS[r["variant"]][0] == "dga" and r["median_ms"]:
            dga.setdefault(r["L"], (r["variant"], r["median_ms"]))
    for r in records:
        ms, (reference, dga_ms) = r["median_ms"], dga.get(r["L"], (None, None))
        speedup = "—" if r["variant"] == reference or not (ms and dga_ms) else f"{ms / dga_ms:.2f}x"
        ms_text = "—" if ms is None else f"{ms:.1f}"
        tok_text = "—" if ms is None else f"{r['tokens_per_s']:.0f}"
        peak = r["xla_peak_bytes"]
        peak_text = "—" if peak is None else f"{peak / GIB:.2f}"
        print(
            f"{length_label(r['L']):>6}  {r['variant']:<16}{ms_text:>11}{tok_text:>11}"
            f"{speedup:>13}{peak_text:>14}  {r['status']}"
        )


def variant_config(args: argparse.Namespace, variant: str) -> ModelConfig:
    """The model of `args.preset` (with `args.layers` layers if given) and `variant` attention,
    its max_position raised to the longest of `args.lengths`."""
    attention, impl = VARIANTS[variant]
    scan = None if args.scan_layers is None else args.scan_layers == "true"
    given = {"num_layers": args.layers, "dtype": args.dtype, "scan_layers": scan}
    # 7B's 4K max_position would refuse the 16K rows the benchmarks time (the model checks).
    positions = max(PRESETS[args.preset].max_position, *args.lengths)
    return ModelConfig.preset(
        args.preset,
        max_position=positions,
        attention=attention,
        attention_impl=impl,
        dga=DGAConfig(args.group_size, args.focal_ratio, args.selection),
        **{name: value for name, value in given.items() if value is not None},
    )


def first_dga(variants: list[str]) -> str | None:
    """The first DGA variant named (the model `prefill.py` measures)."""
    return next((v for v in variants if VARIANTS[v][0] == "dga"), None)


def parse_variant_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    """Arguments of the model-level benchmarks (preset, lengths, batch, DGA settings)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=positive_int, default=None, help="default: the preset's")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="compute; the preset's"
    )
    parser.add_argument(
        "--scan-layers", choices=("true", "false"), default=None, help="default: the preset's"
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma list of {','.join(VARIANTS)}; the first DGA one timed is the speedups' base",
    )
    parser.add_argument("--lengths", type=positive_ints, help="comma list; default 4096,16384")
    parser.add_argument("--batch", type=positive_int, default=1)
    add_dga_args(parser)
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument(
        "--breakdown", action="store_true", help="also trace one call each: time by model scope"
    )
    parser.add_argument("--out", type=out_dir, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.variants = list(dict.fromkeys(args.variants.split(",")))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    check_dga_args(parser, args)
    if args.breakdown and jax.default_backend() != "cpu":  # refused now, not after the timing
        parser.error(f"--breakdown reads XLA:CPU traces, not {jax.default_backend()}'s")
    args.lengths = args.lengths or ([1024, 2048] if args.quick else [4096, 16384])
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def run_variants(name: str, what: str, prepare: Callable[..., tuple], args) -> None:
    """Times every variant at every length in turns, prints the table and writes the JSON.

    `prepare(args, variant, length)` -> (compiled, inputs): one call of the variant. At each
    length every variant that fits is compiled and warmed up, then timed in `args.repeats`
    rounds of one call each (`Calls`), so a change in the machine's load hits all alike.
    """
    env = environment()
    dga = f"m={args.group_size}, gamma={args.focal_ratio:g}, {args.selection} selection"
    print(f"{args.preset} {what} on {env['device_kind']}, B={args.batch}, DGA {dga}")
    records = [r for n in args.lengths for r in variant_records(prepare, args, n)]
    report_variants(records)
    for r in records:
        if "scopes_ms" in r:
            print_scopes(r["variant"], r["L"], r["scopes_ms"])
    print(f"wrote {write_results(name, args, env, records)}")


def variant_records(prepare: Callable[..., tuple], args, length: int) -> list[dict]:
    """Each variant's record at `length`, timed in turns with the others (`run_variants`);
    with `args.breakdown`, then one traced call each (`trace_scopes.scope_ms`)."""
    calls, records = Calls(), {}
    for variant in args.variants:
        try:
            compiled, inputs = prepare(args, variant, length)
            records[variant] = {"L": length, "variant": variant, **fit_record(compiled)}
            if records[variant]["status"] == "ok":
                calls.add_compiled(variant, compiled, *inputs)
        except Exception as err:  # a variant this backend rejects, or out of memory: go on
            records[variant] = {"L": length, "variant": variant, **failed_record(err)}
    tokens = args.batch * length
    for variant, times in calls.time_ms(args.repeats).items():
        records[variant] = timed_record(records[variant], times, tokens)
    if args.breakdown:
        for variant, (compiled, inputs) in calls.calls.items():
            records[variant]["scopes_ms"] = scope_ms(compiled, inputs)
    return list(records.values())
