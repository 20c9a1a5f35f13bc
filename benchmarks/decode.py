"""Decoding: inter-token latency and KV-cache bytes of the `tiny` Llama, DGA cache vs dense cache.

    python benchmarks/decode.py            # prompts of 4K, 8K, 16K, 32K tokens, B=1, float32
    python benchmarks/decode.py --quick    # prompts of 1K, 2K: about a minute on CPU
    python benchmarks/decode.py --preset llama2_7b --dtype bfloat16   # on a GPU: random weights

For each prompt length and cache (DGA: m=16, gamma=0.1, global prefill; dense: prefill with the
blockwise dense attention so that 32K fits), the prompt is prefilled once, then one jitted
`Llama.decode_step` (greedy, caches donated) runs `--warmup` steps and `--steps` timed steps,
the variants taking turns in `--rounds` blocks (one set of weights serves both); the table
gives the median step time, DGA's speedup (dense / DGA), and the bytes of every cache array (all
layers). Results go to `benchmarks/results/decode_<backend>[_quick].{json,png}`.

Expected (the decoding issue's goals): DGA's cache at most 17% of the dense cache's bytes at
every length; its inter-token latency at 16K at least 2.4x lower than dense and nearly flat from
4K to 32K, while dense grows with the cache it reads every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from common import (
    check_dga_args,
    environment,
    failed_record,
    length_label,
    out_dir,
    positive_int,
    positive_ints,
    write_results,
)
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dga_jax import DGAConfig, Llama, ModelConfig
from dga_jax.model.config import DTYPES, PRESETS
from dga_jax.ops.dga.decode import cache_bytes

VARIANTS = {"dga": ("dga", None), "dense": ("dense", "blockwise")}
MIB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="prompts of 1K and 2K tokens")
    p.add_argument("--lengths", type=positive_ints, help="prompt lengths; default 4096,...,32768")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and parameter dtype")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--focal-ratio", type=float, default=0.1)
    p.add_argument("--selection", choices=("global", "streaming"), default="global")
    p.add_argument(
        "--warmup", type=positive_int, default=8, help="untimed steps (the first compiles the step)"
    )
    p.add_argument("--steps", type=positive_int, default=64, help="timed steps (median reported)")
    p.add_argument("--rounds", type=positive_int, default=8, help="turns the variants take")
    p.add_argument("--out", type=out_dir, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    check_dga_args(p, args)
    args.lengths = args.lengths or ([1024, 2048] if args.quick else [4096, 8192, 16384, 32768])
    return args


@dataclasses.dataclass
class Decoder:
    """One variant's jitted decode step with its caches and next tokens, after the prefill."""

    step: Callable
    state: nnx.State
    caches: object
    tokens: jax.Array
    prefill_s: float  # the prefill's wall time, compile included

    def run(self, steps: int) -> list[float]:
        """Runs `steps` decode steps; their wall times in ms."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.tokens, self.caches = jax.block_until_ready(
                self.step(self.state, self.caches, self.tokens)
            )
            times.append((time.perf_counter() - start) * 1e3)
        return times


def model_config(args: argparse.Namespace, variant: str) -> ModelConfig:
    """The preset with the variant's attention and the arguments' DGA settings and dtype."""
    attention, impl = VARIANTS[variant]
    # The longest prompt and its decode steps must fit: tiny's 32K prompt ran past max_position.
    positions = max(args.lengths) + args.warmup + args.steps
    return ModelConfig.preset(
        args.preset,
        max_position=max(PRESETS[args.preset].max_position, positions),
        attention=attention,
        attention_impl=impl,
        dga=DGAConfig(args.group_size, args.focal_ratio, args.selection),
        dtype=args.dtype,
        param_dtype=args.dtype,
    )


def new_model(config: ModelConfig) -> Llama:
    """Random weights, the same for every variant (seed 0)."""
    return Llama(config, rngs=nnx.Rngs(0))


def decoder(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, max_len: int) -> Decoder:
    """Prefills `prompt` [B, L] once and jits the decode step (caches donated)."""

    def prefill(state, tokens):
        logits, caches = nnx.merge(graphdef, state).prefill(tokens, max_len, last_only=True)
        return logits[:, 0].argmax(-1), caches

    def step(state, caches, tokens):
        logits, caches = nnx.merge(graphdef, state).decode_step(tokens, caches)
        return logits.argmax(-1), caches

    start = time.perf_counter()
    tokens, caches = jax.block_until_ready(jax.jit(prefill)(state, prompt))
    prefill_s = time.perf_counter() - start
    return Decoder(jax.jit(step, donate_argnums=1), state, caches, tokens, prefill_s)


def measure(
    args: argparse.Namespace, graphdefs: dict[str, nnx.GraphDef], state: nnx.State, length: int
) -> list[dict]:
    """Prefill a random prompt of `length` tokens in every variant, then time decode steps.

    The variants take turns, `--rounds` blocks of steps each, so that a slow spell of the
    machine falls on all of them alike; every variant's caches are alive at once (LLaMA2-7B in
    bfloat16 at 32K: 16 GiB dense, 2.6 GiB DGA, beside 13.5 GB of weights).
    """
    max_len = length + args.warmup + args.steps
    vocab_size = model_config(args, "dga").vocab_size
    prompt = jax.random.randint(jax.random.key(0), (args.batch, length), 0, vocab_size)
    decoders = {v: decoder(g, state, prompt, max_len) for v, g in graphdefs.items()}
    for d in decoders.values():
        d.run(args.warmup)
    times = {v: [] for v in decoders}
    for i in range(args.rounds):  # `--steps` in all: the first steps % rounds take one more
        for variant, d in decoders.items():
            times[variant] += d.run(args.steps // args.rounds + (i < args.steps % args.rounds))
    return [
        {
            "L": length,
            "variant": variant,
            "median_ms": float(np.median(times[variant])),
            "p10_ms": float(np.percentile(times[variant], 10)),
            "p90_ms": float(np.percentile(times[variant], 90)),
            "times_ms": times[variant],
            "cache_bytes": cache_bytes(d.caches),
            "max_len": max_len,
            "prefill_s_with_compile": d.prefill_s,
            "status": "ok",
        }
        for variant, d in decoders.items()
    ]


def measured(
    args: argparse.Namespace, graphdefs: dict[str, nnx.GraphDef], state: nnx.State, length: int
) -> list[dict]:
    """`measure`, or where it fails (out of memory at a long prompt) each variant's failed
    record: the lengths measured before and after are kept."""
    try:
        return measure(args, graphdefs, state, length)
    except Exception as err:
        return [{"L": length, "variant": v, **failed_record(err)} for v in graphdefs]


def report(records: list[dict]) -> None:
    """One row per prompt length: both latencies, the speedup, both cache sizes, their ratio."""
    print(
        f"{'L':>6}{'DGA ms':>10}{'dense ms':>10}{'speedup':>9}"
        f"{'DGA MiB':>10}{'dense MiB':>11}{'DGA/dense bytes':>17}"
    )
    by = {(r["L"], r["variant"]): r for r in records}
    for length in sorted({r["L"] for r in records}):
        dga, dense = by[length, "dga"], by[length, "dense"]
        if dga["median_ms"] is None:  # `measured` failed at this length
            print(f"{length_label(length):>6}  {dga['status']}")
            continue
        print(
            f"{length_label(length):>6}{dga['median_ms']:>10.2f}{dense['median_ms']:>10.2f}"
            f"{dense['median_ms'] / dga['median_ms']:>8.2f}x"
            f"{dga['cache_bytes'] / MIB:>10.2f}{dense['cache_bytes'] / MIB:>11.2f}"
            f"{dga['cache_bytes'] / dense['cache_bytes']:>16.1%}"
        )


def plot(records: list[dict], args: argparse.Namespace, env: dict, path: Path) -> None:
    """Median inter-token latency and cache MiB vs prompt length, DGA and dense."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (("median_ms", "median inter-token latency (ms)"), ("cache_bytes", "cache (MiB)"))
    for ax, (key, label) in zip(fig.subplots(1, 2), panels, strict=True):
        for variant in VARIANTS:
            points = sorted(
                (r["L"], r[key]) for r in records if r["variant"] == variant and r["median_ms"]
            )
            if points:
                lengths, values = zip(*points, strict=True)
                scale = MIB if key == "cache_bytes" else 1
                ax.plot(lengths, [v / scale for v in values], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.lengths, labels=[length_label(n) for n in args.lengths])
        ax.set_xticks([], minor=True)
        ax.set(xlabel="prompt length", ylabel=label, ylim=(0, None))
        ax.grid(True, alpha=0.3)
        ax.legend()
    dga = f"m={args.group_size}, gamma={args.focal_ratio:g}, {args.selection}"
    title = f"{args.preset} ({args.dtype}) decoding on {env['device_kind']}, B={args.batch}"
    fig.suptitle(f"{title}; DGA {dga}")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Measure every length and cache, print the table, write the JSON and the plot."""
    args = parse_args(argv)
    env = environment()
    print(
        f"{args.preset} ({args.dtype}) decoding on {env['device_kind']} ({env['backend']}), "
        f"B={args.batch}"
    )
    # One set of weights serves every variant: attention changes the graph, not the parameters.
    configs = {v: model_config(args, v) for v in VARIANTS}
    state = nnx.state(new_model(configs["dga"]))
    graphdefs = {
        v: nnx.graphdef(nnx.eval_shape(functools.partial(new_model, c))) for v, c in configs.items()
    }
    records = [r for n in args.lengths for r in measured(args, graphdefs, state, n)]
    report(records)
    path = write_results("decode", args, env, records)
    plot(records, args, env, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
