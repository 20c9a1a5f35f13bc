"""Model forward throughput: the `tiny` Llama preset with dense vs DGA attention.

    python benchmarks/model_forward.py            # L in {4K, 16K}, B=1, float32 on CPU
    python benchmarks/model_forward.py --quick    # L in {1K, 2K}: under a minute

Prints tokens/s (B * L / median forward time), DGA's speedup over each dense variant and XLA's
buffer-assignment peak, and writes `benchmarks/results/model_forward_<backend>[_quick].json`.
Expected on CPU: DGA ahead of both dense variants at 16K, with the materialising "xla" dense
attention using several GiB more memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax
from common import GIB, environment, length_label, time_calls, xla_peak_bytes
from flax import nnx

from dga_jax import DGAConfig, Llama, ModelConfig

VARIANTS = {  # name: (attention, attention_impl)
    "dga_xla": ("dga", "xla"),
    "dense_xla": ("dense", "xla"),
    "dense_blockwise": ("dense", "blockwise"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", default=None, help="comma list; default 4096,16384")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--focal-ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    default = "1024,2048" if args.quick else "4096,16384"
    args.lengths = [int(x) for x in (args.lengths or default).split(",")]
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def measure(args: argparse.Namespace, variant: str, length: int) -> dict:
    """Compile and time one forward of the preset with `variant` attention at `length`."""
    attention, impl = VARIANTS[variant]
    config = ModelConfig.preset(
        args.preset,
        attention=attention,
        attention_impl=impl,
        dga=DGAConfig(args.group_size, args.focal_ratio),
    )
    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    tokens = jax.random.randint(jax.random.key(0), (args.batch, length), 0, config.vocab_size)
    compiled = jax.jit(forward).lower(state, tokens).compile()
    times = time_calls(compiled, [state, tokens], args.repeats)
    median = statistics.median(times)
    return {
        "L": length,
        "variant": variant,
        "median_ms": median,
        "times_ms": times,
        "tokens_per_s": args.batch * length / (median / 1e3),
        "xla_peak_bytes": xla_peak_bytes(compiled),
    }


def report(records: list[dict]) -> None:
    print(
        f"{'L':>6}  {'variant':<16}{'median ms':>11}{'tokens/s':>11}{'DGA speedup':>13}"
        f"{'XLA peak GiB':>14}"
    )
    dga = {r["L"]: r["median_ms"] for r in records if r["variant"] == "dga_xla"}
    for r in records:
        speedup = "—" if r["variant"] == "dga_xla" else f"{r['median_ms'] / dga[r['L']]:.2f}x"
        print(
            f"{length_label(r['L']):>6}  {r['variant']:<16}{r['median_ms']:>11.1f}"
            f"{r['tokens_per_s']:>11.0f}{speedup:>13}{r['xla_peak_bytes'] / GIB:>14.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment()
    print(f"{args.preset} forward on {env['device_kind']}, B={args.batch}")
    records = [measure(args, v, n) for n in args.lengths for v in VARIANTS]
    report(records)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"model_forward_{env['backend']}{'_quick' if args.quick else ''}.json"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(
        json.dumps({"config": config, "environment": env, "records": records}, indent=2) + "\n"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
