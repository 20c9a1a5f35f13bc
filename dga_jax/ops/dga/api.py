"""`dga_attention`: the public entry point, dispatching on `implementation=`."""

from __future__ import annotations

import functools

import jax

from dga_jax.ops.checks import check_block_sizes, check_qkv
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.reference import dga_attention_reference
from dga_jax.ops.dga.xla import dga_attention_xla
from dga_jax.ops.intervals import BlockSizes

IMPLEMENTATIONS = ("reference", "xla")


def dga_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    group_size: int = 16,
    focal_ratio: float = 0.1,
    selection: str = "global",
    scale: float | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Dynamic Group Attention (`shared/DGA_SPEC.md`), causal.

    Args:
      q: [B, L, Hq, D] queries; k, v: [B, L, Hkv, D], Hq a multiple of Hkv (GQA).
      group_size: m, tokens folded into one group entry.
      focal_ratio: gamma in [0, 1], the share of tokens kept individually ("focal").
      selection: "global" (the paper's prefill rule) or "streaming" (strictly causal).
      scale: logit scale, 1/sqrt(D) by default.
      implementation: "reference" (O(L^2), for tests), "xla" (any backend); None picks the
        fastest available on this backend (today "xla", the only production path).
      block_sizes: query/key block sizes of the blockwise implementations.

    Returns:
      [B, L, Hq, D] in q's dtype.
    """
    config = DGAConfig(group_size, focal_ratio, selection)
    scale = check_qkv(q, k, v, scale)
    if implementation is None:
        implementation = "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    return _dga(
        q,
        k,
        v,
        config=config,
        scale=scale,
        implementation=implementation,
        block_sizes=check_block_sizes(block_sizes),
    )


@functools.partial(jax.jit, static_argnames=("config", "scale", "implementation", "block_sizes"))
def _dga(q, k, v, *, config, scale, implementation, block_sizes):
    if implementation == "reference":
        return dga_attention_reference(q, k, v, config, scale)
    return dga_attention_xla(q, k, v, config, scale, block_sizes)
