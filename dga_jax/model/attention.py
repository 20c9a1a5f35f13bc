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
from dga_jax.ops.dense import dense_attention
from dga_jax.ops.dga.api import dga_attention
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
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), rules, dtype)
        self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), rules, dtype)
        self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), rules, dtype)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), rules, dtype)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D], positions: [B, T] -> [B, T, D].

        `positions` only rotate q and k (RoPE); the causal mask and DGA's groups take token t to
        be row t of the sequence, as in packed pretraining.
        """
        config, dtype = self.config, self.config.compute_dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dtype))  # [B, T, H, K]
        k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dtype))  # [B, T, Hkv, K]
        v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dtype))
        inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        with jax.named_scope(config.attention + "_attention"):
            out = self._attend(q, k, v)
        return jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(dtype))

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        config = self.config
        if config.attention == "dense":
            return dense_attention(q, k, v, implementation=config.attention_impl)
        dga = config.dga
        return dga_attention(
            q,
            k,
            v,
            group_size=dga.group_size,
            focal_ratio=dga.focal_ratio,
            selection=dga.selection,
            implementation=config.attention_impl,
        )
