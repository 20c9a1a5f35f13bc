"""The paper's attention kinds side by side: dense, DGA, StreamingLLM, LM-Infinite, MInference.

    python benchmarks/baselines.py            # L in {4K, 8K, 16K, 32K}: long on CPU
    python benchmarks/baselines.py --quick    # L in {1K, 2K}, short decodes: minutes on CPU

Two parts, on the same shapes for every kind:

- attention: one call of each kind's op (B=1, Hq=Hkv=8, D=128; float32 on CPU, bfloat16 on an
  accelerator), forward and forward+backward, median of `--repeats` timed calls after a
  compiling one, and XLA's peak bytes; dense is the blockwise (flash-style, memory linear in L)
  XLA walk, DGA its XLA path (m=16, gamma=0.1), StreamingLLM and LM-Infinite their
  interval-attention op (`dga_jax.ops.sinks`) at their defaults (4 sinks + 2000 recent tokens;
  10 global + 4096 local tokens, distance cap 4096), MInference its vertical-slash prefill
  (`dga_jax.ops.minference`, 1000 columns + 6096 diagonals per head, pattern estimation
  included; forward only: it has no backward);
- decoding: the `tiny` Llama with each kind, a random prompt of L tokens prefilled, then the
  median inter-token latency of `--steps` jitted decode steps (the kinds taking turns), and the
  cache bytes per prompt token (all layers).

Results: a table on stdout and `benchmarks/results/baselines_<backend>[_quick].{json,png}`.
StreamingLLM's and LM-Infinite's costs stop growing with L once L passes their window; DGA's
grows like (gamma + 1/m) L; dense like L (decoding) or L^2 (attention). MInference decodes
densely and its prefill keeps at most 1000 + 6096 lines per head: dense up to about 6K tokens.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
from common import (
    environment,
    failed_record,
    length_label,
    out_dir,
    positive_int,
    positive_ints,
    time_variant,
    write_results,
)
from decode import decoder
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import dga_jax
from dga_jax import Llama, ModelConfig
from dga_jax.ops.dga.decode import cache_bytes
from dga_jax.ops.minference import MInferenceConfig, minference_attention
from dga_jax.ops.sinks import LMInfiniteConfig, StreamingLLMConfig, sink_attention

KINDS = ("dense", "dga", "streaming_llm", "lm_infinite", "minference")
TRAINABLE = KINDS[:-1]
SINKS = {"streaming_llm": StreamingLLMConfig(), "lm_infinite": LMInfiniteConfig()}
MODES = ("fwd", "fwd+bwd")
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="L in {1K, 2K}")
    p.add_argument("--lengths", type=positive_ints, help="comma list; default 4096,...,32768")
    p.add_argument("--repeats", type=positive_int, help="timed calls (default 3; --quick: 2)")
    p.add_argument("--steps", type=positive_int, help="timed decode steps (default 32; quick: 8)")
    p.add_argument("--out", type=out_dir, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.lengths = args.lengths or ([1024, 2048] if args.quick else [4096, 8192, 16384, 32768])
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.steps = args.steps or (8 if args.quick else 32)
    args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return args


def attention(kind: str):
    """q, k, v -> [B, L, Hq, D] for `kind` (the sink kinds with q_far = q, k_far = k: the same
    work as with their own rotations)."""
    if kind == "dense":
        return functools.partial(dga_jax.dense_attention, implementation="blockwise")
    if kind == "dga":
        return functools.partial(dga_jax.dga_attention, implementation="xla")
    if kind == "minference":
        return functools.partial(minference_attention, config=MInferenceConfig())

    def sinks(q, k, v):
        return sink_attention(q, k, v, q, k, SINKS[kind])

    return sinks


def attention_record(kind: str, mode: str, length: int, args: argparse.Namespace) -> dict:
    """One kind's timed call; one that fails (out of memory, a length it refuses) is recorded
    as failed and the other kinds still run."""
    try:
        record = timed_attention(kind, mode, length, args)
    except Exception as err:
        record = failed_record(err)
    return {"part": "attention", "kind": kind, "mode": mode, "L": length, **record}


def timed_attention(kind: str, mode: str, length: int, args: argparse.Namespace) -> dict:
    """`time_variant`'s record of one compiled call of `kind` in `mode` at `length`."""
    forward = attention(kind)
    attn = forward
    if mode == "fwd+bwd":

        def loss(q, k, v):
            return jnp.sum(forward(q, k, v).astype(jnp.float32))

        attn = jax.grad(loss, (0, 1, 2))
    shape = (1, length, 8, 128)
    keys = jax.random.split(jax.random.key(0), 3)
    inputs = [jax.random.normal(key, shape, args.dtype) for key in keys]
    compiled = jax.jit(attn).lower(*inputs).compile()
    return time_variant(compiled, inputs, length, args.repeats)


def decode_records(length: int, args: argparse.Namespace) -> list[dict]:
    """Every kind's tiny model prefilled with the same prompt, then timed in turns; a kind that
    fails to prefill or step is recorded as failed and the others still run."""
    max_len = length + 2 + args.steps  # 2 untimed steps, then `--steps` timed
    configs = {kind: ModelConfig.preset("tiny", attention=kind) for kind in KINDS}
    configs["dense"] = configs["dense"].replace(attention_impl="blockwise")
    state = nnx.state(Llama(configs["dga"], rngs=nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(0), (1, length), 0, configs["dga"].vocab_size)
    decoders, failed = {}, []
    for kind, config in configs.items():
        graphdef = nnx.graphdef(nnx.eval_shape(lambda c=config: Llama(c, rngs=nnx.Rngs(0))))
        try:
            d = decoder(graphdef, state, prompt, max_len)
            d.run(2)
            decoders[kind] = d
        except Exception as err:
            failed.append({"part": "decode", "kind": kind, "L": length, **failed_record(err)})
    times = {kind: [] for kind in decoders}
    for i in range(2):  # `--steps` in all, in two turns: the first takes one more if odd
        for kind, d in decoders.items():
            times[kind] += d.run(args.steps // 2 + (i < args.steps % 2))
    return [
        {
            "part": "decode",
            "kind": kind,
            "L": length,
            "median_ms": statistics.median(times[kind]),
            "times_ms": times[kind],
            "cache_bytes": cache_bytes(d.caches),
            "cache_bytes_per_token": cache_bytes(d.caches) / length,
            "status": "ok",
        }
        for kind, d in decoders.items()
    ] + failed


def report(records: list[dict]) -> None:
    print(
        f"{'L':>6}  {'kind':<15}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MiB':>10}"
        f"{'decode ms':>11}{'cache B/token':>15}"
    )
    by = {(r["part"], r.get("mode"), r["kind"], r["L"]): r for r in records}
    for length in sorted({r["L"] for r in records}):
        for kind in KINDS:
            fwd = by.get(("attention", "fwd", kind, length), {})
            bwd = by.get(("attention", "fwd+bwd", kind, length), {})
            dec = by.get(("decode", None, kind, length), {})
            print(
                f"{length_label(length):>6}  {kind:<15}{number(fwd, 'median_ms'):>9}"
                f"{number(bwd, 'median_ms'):>12}{number(bwd, 'xla_peak_bytes', MIB):>10}"
                f"{number(dec, 'median_ms', digits=2):>11}"
                f"{number(dec, 'cache_bytes_per_token', digits=0):>15}"
            )
    for r in records:
        if r["status"] != "ok":
            print(f"{length_label(r['L'])} {r['kind']} {r.get('mode', 'decode')}: {r['status']}")


def number(record: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    """`record[key] / scale` with thousands separators, or a dash where it was not measured."""
    value = record.get(key)
    return "—" if value is None else f"{value / scale:,.{digits}f}"


def plot(records: list[dict], args: argparse.Namespace, env: dict, path: Path) -> None:
    fig = Figure(figsize=(13, 8), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [
        ("attention", "fwd", "median_ms", "attention forward (ms)"),
        ("attention", "fwd+bwd", "median_ms", "attention forward + backward (ms)"),
        ("decode", None, "median_ms", "inter-token latency, tiny model (ms)"),
        ("decode", None, "cache_bytes_per_token", "cache bytes per prompt token"),
    ]
    for ax, (part, mode, key, label) in zip(fig.subplots(2, 2).flat, panels, strict=True):
        for kind in KINDS:
            points = sorted(
                (r["L"], r[key])
                for r in records
                if r["part"] == part
                and r.get("mode") == mode
                and r["kind"] == kind
                and r.get(key) is not None
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.lengths, labels=[length_label(n) for n in args.lengths])
        ax.set_xticks([], minor=True)
        ax.set(xlabel="L", ylabel=label, ylim=(0, None))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"attention kinds on {env['device_kind']} ({args.dtype})")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment()
    print(f"attention kinds on {env['device_kind']} ({env['backend']}), {args.dtype}")
    records = []
    for length in args.lengths:
        for mode in MODES:
            kinds = KINDS if mode == "fwd" else TRAINABLE
            records += [attention_record(kind, mode, length, args) for kind in kinds]
        records += decode_records(length, args)
    report(records)
    path = write_results("baselines", args, env, records)
    plot(records, args, env, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
