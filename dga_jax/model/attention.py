"""`DGAttention`: multi-head attention (GQA, RoPE) whose core is DGA or dense causal attention.

An NNX module with no kernel code in it: the math lives in `dga_jax.ops`. Importable on its own
(`from dga_jax import DGAttention`) to put DGA into other Flax models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dga_jax.model.config import ModelConfig
from dga_jax.model.layers import apply_rope, param, rope_frequencies
from dga_jax.ops.context import ContextSplit
from dga_jax.ops.dense import dense_attention
from dga_jax.ops.dga.api import dga_attention
from dga_jax.ops.dga.decode import (
    DenseCache,
    DenseUpdate,
    DGACache,
    DGAUpdate,
    attend_step,
    prefill,
)
from dga_jax.ops.dga.sharded import per_shard
from dga_jax.sharding import DEFAULT_RULES, LogicalRules


class DGAttention(nnx.Module):
    """q/k/v/o projections around `dga_attention` (config.attention == "dga") or dense."""

    def __init__(self, config: ModelConfig, rules: LogicalRules = DEFAULT_RULES, *, rngs: nnx.Rngs):
        d, h, kv, hd, dtype = (
            config.d_model,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.weight_dtype,
        )
        self.config = config
        self.rules = rules
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), rules, dtype)
        self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), rules, dtype)
        self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), rules, dtype)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), rules, dtype)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D], positions: [B, T] -> [B, T, D].

        `positions` only rotate q and k (RoPE); the causal mask and DGA's groups take token t to
        be row t of the sequence, as in packed pretraining, or, with config.context_order
        "zigzag" and the sequence split over the mesh, row i to hold position
        `zigzag_order(T, P)[i]` (`Llama` passes those positions).
        """
        q, k, v = self._qkv(x, positions)
        return self._project(self._attend(q, k, v))

    def prefill(
        self,
        x: jax.Array,
        max_len: int,
        capacity: int | None = None,
        lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, DGACache | DenseCache]:
        """x: [B, P, D] at positions 0..P-1 -> (the same [B, P, D] as `__call__`, the cache).

        The cache (DGA's for config.attention == "dga", else dense) holds up to `max_len`
        tokens; `capacity` is the DGA prefix capacity (`dga_jax.ops.dga.decode.prefix_capacity`).
        `lengths` [B]: rows right-padded, row b valid up to lengths[b] (`dga_attention`).
        """
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        q, k, v = self._qkv(x, positions)
        config = self.config
        dga = config.dga if config.attention == "dga" else None
        cache = prefill(q, k, v, max_len=max_len, config=dga, capacity=capacity, lengths=lengths)
        return self._project(self._attend(q, k, v, lengths)), cache

    def decode(
        self, x: jax.Array, cache: DGACache | DenseCache
    ) -> tuple[jax.Array, DGAUpdate | DenseUpdate]:
        """x: [B, 1, D], one token per row at position `cache.length` -> ([B, 1, D], update).

        Reads `cache` only; `dga_jax.ops.dga.decode.apply_update` writes the returned update.
        """
        q, k, v = self._qkv(x, cache.length[:, None])
        out, update = attend_step(q[:, 0], k[:, 0], v[:, 0], cache)
        return self._project(out[:, None]), update

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, T, D] -> q [B, T, H, K], k/v [B, T, Hkv, K], q and k rotated."""
        config, dtype = self.config, self.config.compute_dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dtype))  # [B, T, H, K]
        k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dtype))  # [B, T, Hkv, K]
        v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dtype))
        inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def _project(self, out: jax.Array) -> jax.Array:
        """[B, T, H, K] -> [B, T, D]."""
        return jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(self.config.compute_dtype))

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, lengths=None) -> jax.Array:
        config = self.config
        with jax.named_scope(config.attention + "_attention"):
            return self._core(q, k, v, lengths)

    def _core(self, q: jax.Array, k: jax.Array, v: jax.Array, lengths=None) -> jax.Array:
        """Attention per device shard under a mesh: batch and heads split, and the sequence as
        `config.context_parallel` says (`dga_jax.ops.dga.sharded`)."""
        batch, seq, heads, _ = self.rules.spec(("batch", "seq", "act_heads", None))
        return per_shard(
            self._kernel,
            q,
            k,
            v,
            batch=batch,
            seq=seq,
            heads=heads,
            strategy=self.config.context_parallel,
            zigzag=self.config.context_order == "zigzag",
            lengths=lengths,
        )

    def _kernel(self, q, k, v, lengths=None, *, split: ContextSplit) -> jax.Array:
        """Causal dense attention never lets a valid query see right padding: it needs no
        `lengths`; DGA's selection does."""
        config = self.config
        if config.attention == "dense":
            return dense_attention(q, k, v, implementation=config.attention_impl, split=split)
        dga = config.dga
        return dga_attention(
            q,
            k,
            v,
            group_size=dga.group_size,
            focal_ratio=dga.focal_ratio,
            selection=dga.selection,
            implementation=config.attention_impl,
            split=split,
            lengths=lengths,
        )
