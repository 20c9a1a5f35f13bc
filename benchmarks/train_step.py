"""Train-step throughput and memory: the `tiny` preset with dense vs DGA attention.

    python benchmarks/train_step.py            # L in {4K, 16K}, B=1, float32 on CPU
    python benchmarks/train_step.py --quick    # L in {1K, 2K}: about a minute
    python benchmarks/train_step.py --lengths 16384 --breakdown   # and time by model scope
    python benchmarks/train_step.py --preset llama2_7b --layers 2 --dtype bfloat16 \\
        --lengths 16384 --variants dga_pallas_gpu,dga_xla,dense_cudnn   # a GPU: 2 of 7B's layers

Times the jitted step of `train/step.py` (forward, backward, AdamW update) on random tokens, the
variants in turns (`variants.run_variants`), and prints tokens/s, DGA's speedup over each dense
variant and XLA's buffer-assignment peak; writes
`benchmarks/results/train_step_<backend>[_quick].json`. Goal on CPU: DGA at 16K at least 1.5x
the dense tokens/s.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from variants import parse_variant_args, run_variants, variant_config

from dga_jax import Llama

sys.path.insert(0, str(Path(__file__).parents[1]))  # `train/` is the repo's, not the wheel's
from train.config import OptimConfig  # noqa: E402
from train.step import TrainState, make_optimizer, train_step, weight_decay_mask  # noqa: E402


def prepare(args: argparse.Namespace, variant: str, length: int) -> tuple:
    """One optimizer step at `length` tokens per row: (compiled, inputs)."""
    config = variant_config(args, variant)
    graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    tx = make_optimizer(OptimConfig(), 1000, weight_decay_mask(params))
    zero = functools.partial(jnp.zeros, (), jnp.int32)
    state = TrainState(zero(), params, tx.init(params), zero(), zero())
    tokens = jax.random.randint(jax.random.key(0), (1, args.batch, length), 0, config.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=-1)}
    step = jax.jit(functools.partial(train_step, graphdef, tx))
    compiled = step.lower(state, batch).compile()
    return compiled, [state, batch]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The variants' flags (`variants.parse_variant_args`)."""
    return parse_variant_args(__doc__.splitlines()[0], argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_variants("train_step", "train step", prepare, args)


if __name__ == "__main__":
    main()
