"""`dga_attention`: the public entry point, dispatching on `implementation=`."""

from __future__ import annotations

import functools

import jax

from dga_jax.ops.checks import check_lengths, check_qkv
from dga_jax.ops.context import WHOLE, ContextSplit, check_split
from dga_jax.ops.dga.backends import (
    check_implementation,
    importance_implementation,
    interval_implementation,
)
from dga_jax.ops.dga.compressed import compressed_attention
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.layout import DGALayout
from dga_jax.ops.dga.reference import dga_attention_reference
from dga_jax.ops.tiles import BlockSizes
from dga_jax.sharding import with_auto_axes

IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu")


def dga_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    config: DGAConfig | None = None,
    *,
    group_size: int | None = None,
    focal_ratio: float | None = None,
    selection: str | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: object = False,
    split: ContextSplit = WHOLE,
    lengths: jax.Array | None = None,
    layout: DGALayout | None = None,
) -> jax.Array:
    """Dynamic Group Attention (`docs/DGA_SPEC.md`), causal.

    Differentiable in reverse mode (`jax.grad`, `jax.vjp`: a custom VJP); under "xla" also
    forward over reverse (Hessian-vector products, `jax.hessian`; tested, the kernels' not);
    not in forward mode (`jax.jvp`, `jax.jacfwd`, `jax.linearize`: JAX's "can't apply
    forward-mode autodiff (jvp) to a custom_vjp function") nor reverse over reverse (`jax.grad`
    of `jax.grad`: the backward's loops have dynamic bounds), except "reference".

    Args:
      q: [B, L, Hq, D] queries; k, v: [B, L, Hkv, D], Hq a multiple of Hkv (GQA).
      config: the DGA hyper-parameters as one `DGAConfig`; or give them one by one:
      group_size: m, tokens folded into one group entry (default 16).
      focal_ratio: gamma in [0, 1], the share of tokens kept individually ("focal"; 0.1).
      selection: "global" (the paper's prefill rule, the default) or "streaming" (strictly
        causal).
      scale: logit scale, 1/sqrt(D) by default.
      implementation: "reference" (O(L^2), for tests), "xla" (any backend), "pallas_gpu"
        (Triton kernels), "pallas_tpu" (Mosaic kernels). None picks "pallas_gpu" for
        bfloat16/float16 inputs placed on GPUs (measured faster on an H100), else "xla".
      block_sizes: query/key block sizes of the blockwise implementations, refused for
        "reference" (the kernels have their own defaults and tile rules: powers of two >= 16 on
        GPU; block_q a multiple of 16 and block_k of 128 on TPU); for "pallas_gpu" also the
        Triton walks' num_warps and num_stages.
      interpret: run a Pallas implementation in interpret mode (any backend, for tests): True,
        or for "pallas_tpu" a `pltpu.InterpretParams` (race and out-of-bounds detection).

      split: inside a `jax.shard_map` whose inputs hold contiguous parts of the sequence, the
        mesh axis and part count (`ContextSplit`): q, k, v are then [B, L / parts, H, D], and
        only compressed KV', sampled queries and statistics cross devices ("dga" context
        parallelism, `dga_jax.ops.dga.sharded`). Not for "reference".
      lengths: [B] ints in [1, L], the valid positions of each row of a right-padded batch:
        outputs at row b's first lengths[b] positions are those of that prefix alone (its own
        r, sampled queries and groups; padding is never attended), later positions are finite
        and meaningless. One compile serves every mix of lengths. Concrete values outside
        [1, L] are an error (traced ones are clipped to [0, L]). Padding values must still be
        finite: a NaN or inf there reaches the row's outputs and gradients (0 * inf in the
        weighted sums). Not for "reference", nor under a split.
      layout: the `DGALayout` of this sequence, already built by `dga_layout` from the same q,
        k, config, scale and lengths (whole-sequence shapes [B, Hkv, L] even under a split):
        selection is skipped and the entries are gathered from it. What prefill does, which
        also builds the decoding cache from it. The layout holds each row's length: `lengths`
        must then be left out, also under a split. Not for "reference", which selects by
        itself.

    Returns:
      [B, L, Hq, D] in q's dtype ([B, L / parts, Hq, D] under a split).
    """
    config = _check_config(
        config, group_size=group_size, focal_ratio=focal_ratio, selection=selection
    )
    scale = check_qkv(q, k, v, scale)
    implementation, block_sizes = check_implementation(
        implementation, block_sizes, interpret, q, k, v, allowed=IMPLEMENTATIONS
    )
    check_split(split, "dga_attention")
    if implementation == "reference":
        _check_reference(split, lengths, layout)
    lengths = _check_lengths(lengths, q, split)
    _check_layout(layout, lengths, config, q, k, split)
    run = functools.partial(
        _dga,
        config=config,
        scale=scale,
        implementation=implementation,
        block_sizes=block_sizes,
        interpret=interpret,
        split=split,
    )
    return with_auto_axes(run, q, k, v, lengths, layout)


def _check_config(config: DGAConfig | None, **fields) -> DGAConfig:
    """A `DGAConfig`, or one from the fields given (never both)."""
    given = {name: value for name, value in fields.items() if value is not None}
    if config is None:
        return DGAConfig(**given)
    if not isinstance(config, DGAConfig):
        raise TypeError(f"config must be a DGAConfig, got {type(config).__name__}")
    if given:
        raise ValueError(f"pass either config= or {', '.join(sorted(given))}, not both")
    return config


def _check_reference(split: ContextSplit, lengths, layout) -> None:
    """The reference selects by itself over whole, unpadded sequences: it takes none of these."""
    given = {
        "split": split.shards > 1,
        "lengths": lengths is not None,
        "layout": layout is not None,
    }
    for name, is_given in given.items():
        if is_given:
            raise ValueError(
                f"{name}= is not supported with implementation='reference', which selects by "
                "itself over whole, unpadded sequences; use implementation='xla'"
            )


def _check_lengths(lengths, q, split: ContextSplit):
    """-> lengths as an int32 array [B] (or None); errors name the problem."""
    if lengths is not None and split.shards > 1:
        raise ValueError(
            "per-row lengths are not supported with a ContextSplit: pass the layout "
            "(dga_layout(lengths=)) instead, which holds them"
        )
    return check_lengths(lengths, q.shape[0], q.shape[1])


def _check_layout(layout, lengths, config: DGAConfig, q, k, split: ContextSplit):
    """A given layout must be a `DGALayout` of these rows, heads and settings."""
    if layout is None:
        return
    if not isinstance(layout, DGALayout):
        raise TypeError(f"layout must be a DGALayout (dga_layout), got {type(layout).__name__}")
    if lengths is not None:
        raise ValueError(
            "pass either lengths= or layout=, not both: the layout holds each row's length "
            "(dga_layout(lengths=))"
        )
    seq_len = q.shape[1] * split.shards
    want = (q.shape[0], k.shape[2], seq_len)
    if layout.focal.shape != want or layout.sizes != config.sizes(seq_len):
        raise ValueError(
            f"layout is for [B, Hkv, L] = {list(layout.focal.shape)} with {layout.sizes}; these "
            f"q, k and config need {list(want)} with {config.sizes(seq_len)}"
        )


@functools.partial(
    jax.jit,
    static_argnames=("config", "scale", "implementation", "block_sizes", "interpret", "split"),
)
def _dga(
    q,
    k,
    v,
    lengths=None,
    layout=None,
    *,
    config,
    scale,
    implementation,
    block_sizes,
    interpret,
    split,
):
    if implementation == "reference":
        return dga_attention_reference(q, k, v, config, scale)
    attend = interval_implementation(implementation, interpret)
    passes = importance_implementation(implementation, interpret)
    return compressed_attention(
        attend, q, k, v, config, scale, block_sizes, split, lengths, layout, passes
    )
