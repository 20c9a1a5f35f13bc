"""Model forward throughput: the `tiny` Llama preset with dense vs DGA attention.

    python benchmarks/model_forward.py            # L in {4K, 16K}, B=1, float32 on CPU
    python benchmarks/model_forward.py --quick    # L in {1K, 2K}: under a minute
    python benchmarks/model_forward.py --lengths 16384 --breakdown   # and time by model scope
    python benchmarks/model_forward.py --preset llama2_7b --layers 2 --dtype bfloat16 \\
        --lengths 16384 --variants dga_pallas_gpu,dga_xla,dense_cudnn   # a GPU: 2 of 7B's layers

Times the variants in turns (`variants.run_variants`). Prints tokens/s (B * L / median forward
time), DGA's speedup over each dense variant and XLA's buffer-assignment peak, and writes
`benchmarks/results/model_forward_<backend>[_quick].json`.
Expected on CPU: DGA ahead of both dense variants at 16K, with the materialising "xla" dense
attention using several GiB more memory.
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx
from variants import parse_variant_args, run_variants, variant_config

from dga_jax import Llama


def prepare(args: argparse.Namespace, variant: str, length: int) -> tuple:
    """One forward of the preset with `variant` attention at `length`: (compiled, inputs)."""
    config = variant_config(args, variant)
    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    tokens = jax.random.randint(jax.random.key(0), (args.batch, length), 0, config.vocab_size)
    compiled = jax.jit(forward).lower(state, tokens).compile()
    return compiled, [state, tokens]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The variants' flags (`variants.parse_variant_args`)."""
    return parse_variant_args(__doc__.splitlines()[0], argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_variants("model_forward", "forward", prepare, args)


if __name__ == "__main__":
    main()
