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
from pathlib import Path

import jax
from common import environment, report_variants, time_variant, write_results
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
    record = time_variant(compiled, [state, tokens], args.batch * length, args.repeats)
    return {"L": length, "variant": variant, **record}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment()
    print(f"{args.preset} forward on {env['device_kind']}, B={args.batch}")
    records = [measure(args, v, n) for n in args.lengths for v in VARIANTS]
    report_variants(records)
    print(f"wrote {write_results('model_forward', args, env, records)}")


if __name__ == "__main__":
    main()
