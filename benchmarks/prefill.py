"""Prefill vs forward: what building the decoding cache adds to a prompt's forward pass.

    python benchmarks/prefill.py                 # the tiny DGA model at L in {4K, 16K}, CPU
    python benchmarks/prefill.py --quick         # L in {1K, 2K}

`Llama.prefill(tokens, max_len, last_only=True)` (the logits of the last token and every
layer's cache) against the forward over the same tokens (`Llama(tokens)[:, -1]`), each jitted
once, then timed in `--repeats` rounds of one call each, taking turns (`common.Calls`; the
median is reported).
Prefill's extra work is the cache: with DGA, selection runs once for the prompt's attention and
its cache (`dga_attention(layout=)`), so prefill should cost little more than the forward; the
compiled programs' loop counts (`while` ops: importance passes, radix select, walks) show it.
Results: the table and `benchmarks/results/prefill_<backend>[_quick].json`.
"""

from __future__ import annotations

import statistics

import jax
from common import Calls, environment, failed_record, length_label, write_results
from flax import nnx
from variants import first_dga, parse_variant_args, variant_config

from dga_jax import Llama

DECODE_ROOM = 64  # tokens the caches have room for past the prompt


def measure(args, variant: str, length: int) -> dict:
    """Forward and prefill of one length, compiled, then timed in alternation."""
    config = variant_config(args, variant)
    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (args.batch, length), 0, config.vocab_size)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[:, -1]

    def prefill(state, tokens):
        model = nnx.merge(graphdef, state)
        return model.prefill(tokens, length + DECODE_ROOM, last_only=True)

    calls = Calls()
    for name, fn in (("forward", forward), ("prefill", prefill)):
        calls.add(name, fn, state, tokens)
    times = calls.time_ms(args.repeats)
    record = {"L": length}
    for name, (fn, inputs) in calls.calls.items():
        record[f"{name}_ms"] = statistics.median(times[name])
        record[f"{name}_times_ms"] = times[name]
        record[f"{name}_loops"] = fn.lower(*inputs).compile().as_text().count(" while(")
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_variant_args(__doc__.splitlines()[0], argv)
    env = environment()
    dga = first_dga(args.variants)
    if dga is None:
        raise SystemExit(f"prefill.py measures DGA: --variants {args.variants} names no dga_*")
    if args.breakdown:
        raise SystemExit("prefill.py times whole calls: --breakdown is model_forward.py's option")
    print(f"{args.preset} DGA prefill vs forward on {env['device_kind']}, B={args.batch}, {dga}")
    print(f"{'L':>6}{'forward ms':>12}{'prefill ms':>12}{'prefill/fwd':>13}{'loops f/p':>11}")
    records = []
    for length in args.lengths:
        try:
            r = {**measure(args, dga, length), "status": "ok"}
        except Exception as err:  # out of memory at a long prompt: the other lengths still run
            r = {"L": length, **failed_record(err)}
        records.append(r)
        if r["status"] != "ok":
            print(f"{length_label(length):>6}  {r['status']}")
            continue
        ratio = r["prefill_ms"] / r["forward_ms"]
        loops = f"{r['forward_loops']}/{r['prefill_loops']}"
        print(
            f"{length_label(length):>6}{r['forward_ms']:>12.1f}{r['prefill_ms']:>12.1f}"
            f"{ratio:>12.2f}x{loops:>11}"
        )
    print(f"wrote {write_results('prefill', args, env, records)}")


if __name__ == "__main__":
    main()
