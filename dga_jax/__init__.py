"""dga-jax: Dynamic Group Attention for long-context language models in JAX."""

from dga_jax.generate import Buckets, completions, generate, stream
from dga_jax.model import DGAttention, Llama, ModelConfig, RopeScaling
from dga_jax.ops.context import ContextSplit, zigzag_order
from dga_jax.ops.dense import dense_attention
from dga_jax.ops.dense_decode import DenseCache
from dga_jax.ops.dga import DGAConfig, DGALayout, dga_attention, dga_layout, gather_entries
from dga_jax.ops.dga.capacity import prefix_capacity
from dga_jax.ops.dga.decode import DGACache, decode_step, prefill
from dga_jax.ops.tiles import BlockSizes
from dga_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh

__all__ = [
    "DEFAULT_RULES",
    "BlockSizes",
    "Buckets",
    "ContextSplit",
    "DGACache",
    "DGAConfig",
    "DGALayout",
    "DGAttention",
    "DenseCache",
    "Llama",
    "LogicalRules",
    "ModelConfig",
    "RopeScaling",
    "completions",
    "dense_attention",
    "dga_attention",
    "decode_step",
    "dga_layout",
    "gather_entries",
    "generate",
    "make_mesh",
    "prefill",
    "prefix_capacity",
    "stream",
    "zigzag_order",
]
__version__ = "0.1.0"
