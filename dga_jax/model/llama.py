"""`Llama`: a LLaMA-style decoder with a scanned stack of layers and pluggable DGA attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dga_jax.model.attention import DGAttention
from dga_jax.model.config import ModelConfig
from dga_jax.model.layers import MLP, RMSNorm, param
from dga_jax.sharding import DEFAULT_RULES, LogicalRules

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then SwiGLU MLP."""

    def __init__(self, config: ModelConfig, rules: LogicalRules, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config, rules, rngs=rngs)
        self.attn = DGAttention(config, rules, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rules, rngs=rngs)
        self.mlp = MLP(config, rules, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:  # [B, T, D]
        with jax.named_scope("attention_block"):
            x = x + self.attn(self.attn_norm(x), positions)
        with jax.named_scope("mlp_block"):
            return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """Embedding, `num_layers` decoder layers stacked on a leading axis and scanned, norm, head."""

    def __init__(self, config: ModelConfig, rules: LogicalRules = DEFAULT_RULES, *, rngs: nnx.Rngs):
        self.config = config
        self.rules = rules
        self.embed = param(
            rngs,
            (config.vocab_size, config.d_model),
            ("vocab", "embed"),
            rules,
            config.weight_dtype,
            nnx.initializers.normal(0.02),
        )
        self.layers = _stacked_layers(config, rules, rngs)
        self.norm = RMSNorm(config, rules, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = param(
                rngs,
                (config.d_model, config.vocab_size),
                ("embed", "vocab"),
                rules,
                config.weight_dtype,
            )

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens: [B, T] int -> float32 logits [B, T, V]; positions default to 0..T-1."""
        config = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed[...].astype(config.compute_dtype)[tokens]  # [B, T, D]
        x = self._constrain(x)
        graphdef, state = nnx.split(self.layers)

        def layer_step(x, layer_state):
            return self._constrain(nnx.merge(graphdef, layer_state)(x, positions)), None

        if config.remat != "none":
            layer_step = jax.checkpoint(layer_step, policy=REMAT[config.remat])
        x, _ = jax.lax.scan(layer_step, x, state)
        x = self.norm(x)
        head = self.embed[...].T if config.tie_embeddings else self.lm_head[...]
        return jnp.einsum(
            "btd,dv->btv", x, head.astype(config.compute_dtype), preferred_element_type=jnp.float32
        )

    def _constrain(self, x: jax.Array) -> jax.Array:
        """Pins activations [B, T, D] to (batch, seq) sharding where a mesh is set."""
        if jax.sharding.get_abstract_mesh().empty:
            return x
        return jax.lax.with_sharding_constraint(x, self.rules.spec(("batch", "seq", "act_embed")))


def _stacked_layers(config: ModelConfig, rules: LogicalRules, rngs: nnx.Rngs) -> DecoderLayer:
    """`num_layers` DecoderLayers whose parameters are stacked on a new leading `layers` axis."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"},
    )
    def create(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, rules, rngs=rngs)

    return create(rngs)
