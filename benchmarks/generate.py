"""Generation over many prompt lengths: compiles and wall time, one compile per length vs buckets.

    python benchmarks/generate.py            # 64 prompts, 1K-8K tokens, 32 new each (~15 min CPU)
    python benchmarks/generate.py --quick    # 16 prompts, 256-2K tokens: a few minutes

The `tiny` Llama with DGA (m = 16, gamma = 0.1, global selection, random weights) generates
greedily for prompts of all different lengths, two ways, in one run:

- "per length": each prompt alone at its exact length (`Buckets(growth="exact")`,
  `batch_size=1`), as generation worked before per-row lengths: a prefill and a decode compile
  for every length;
- "buckets": `dga_jax.generate(..., batch_size=--batch, buckets=Buckets(--bucket))`: prompts
  right-padded to powers of two from --bucket, one prefill per batch with each row's length.

The table gives the XLA compiles each way ran (`dga_jax.generate.compile_count`, every jitted
function), the prefill functions' own compiles, the wall time, the speedup, and whether the
tokens are identical (greedy decoding of the same model: they must be). Results go to
`benchmarks/results/generate_<backend>[_quick].json`.

Expected (the generation issue's goals): at most one prefill compile per bucket, and the
bucketed run at least 5x faster end to end than one compile per length.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
from common import environment, out_dir, positive_int, write_results
from flax import nnx

import dga_jax
from dga_jax import DGAConfig, Llama, ModelConfig
from dga_jax.generate import Buckets, _prefill_rows, compile_count

MODEL = ModelConfig.preset("tiny", attention="dga", dga=DGAConfig(16, 0.1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 prompts of 256 to 2K tokens")
    p.add_argument("--prompts", type=positive_int, help="how many prompts (default 64; quick: 16)")
    p.add_argument("--shortest", type=positive_int, help="default 1024 (quick: 256)")
    p.add_argument("--longest", type=positive_int, help="default 8192 (quick: 2048)")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--batch", type=positive_int, default=8, help="batch_size of the bucketed run")
    p.add_argument("--bucket", type=positive_int, help="smallest bucket (default: --shortest)")
    p.add_argument("--out", type=out_dir, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    quick = args.quick
    args.prompts = args.prompts or (16 if quick else 64)
    args.shortest = args.shortest or (256 if quick else 1024)
    args.longest = args.longest or (2048 if quick else 8192)
    args.bucket = args.bucket or args.shortest
    if args.longest - args.shortest + 1 < args.prompts:
        p.error(
            f"--shortest {args.shortest} to --longest {args.longest} holds fewer than "
            f"--prompts {args.prompts} distinct lengths"
        )
    if not MODEL.positions_fit(args.longest + args.new_tokens - 1):  # the last token is not fed
        p.error(
            f"--longest {args.longest} and --new-tokens {args.new_tokens} need "
            f"{args.longest + args.new_tokens - 1} positions, past the tiny model's "
            f"max_position={MODEL.max_position}"
        )
    return args


def prompt_set(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    """`--prompts` random prompts of distinct lengths spread over [shortest, longest]."""
    rng = np.random.default_rng(0)
    lengths = rng.choice(np.arange(args.shortest, args.longest + 1), args.prompts, replace=False)
    return [rng.integers(3, vocab_size, size=int(n)).tolist() for n in lengths]


def run(name: str, model: Llama, prompts: list[list[int]], new: int, **options) -> dict:
    """Generates for every prompt the way `options` say: wall time, compiles, tokens."""
    jax.clear_caches()  # each way compiles everything it needs, none of the other's
    compiles, start = compile_count(), time.perf_counter()
    if options.pop("alone"):
        tokens = [dga_jax.generate(model, [p], new, **options)[0] for p in prompts]
    else:
        tokens = dga_jax.generate(model, prompts, new, progress=True, **options)
    wall = time.perf_counter() - start
    return {
        "way": name,
        "wall_s": wall,
        "compiles": compile_count() - compiles,
        "prefill_compiles": _prefill_rows._cache_size(),
        "tokens": tokens,
    }


def report(records: list[dict], args: argparse.Namespace) -> None:
    """One row per way; the speedup and token identity relative to "per length"."""
    base = records[0]
    print(f"{args.prompts} prompts of {args.shortest}-{args.longest} tokens, {args.new_tokens} new")
    header = f"{'way':<12}{'compiles':>10}{'prefill compiles':>18}{'wall s':>10}{'speedup':>9}"
    print(header + "  tokens")
    for r in records:
        same = "identical" if r["tokens"] == base["tokens"] else "DIFFERENT"
        print(
            f"{r['way']:<12}{r['compiles']:>10}{r['prefill_compiles']:>18}{r['wall_s']:>10.1f}"
            f"{base['wall_s'] / r['wall_s']:>8.2f}x  {same}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment()
    model = Llama(MODEL, rngs=nnx.Rngs(0))
    prompts = prompt_set(args, MODEL.vocab_size)
    buckets = Buckets(args.bucket)
    records = [
        run("per length", model, prompts, args.new_tokens, alone=True, buckets=Buckets(1, "exact")),
        run(
            "buckets",
            model,
            prompts,
            args.new_tokens,
            alone=False,
            batch_size=args.batch,
            buckets=buckets,
        ),
    ]
    report(records, args)
    widths = sorted({buckets.round_up(len(p)) for p in prompts})
    print(f"buckets used: {widths}")
    expected = records[0]["tokens"]
    for r in records:
        r["identical_to_per_length"] = r.pop("tokens") == expected
    records.append({"buckets": widths})
    path = write_results("generate", args, env, records)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
