"""dga-jax: Dynamic Group Attention for long-context language models in JAX."""

from dga_jax.ops.dense import dense_attention
from dga_jax.ops.dga import DGAConfig, DGALayout, dga_attention, dga_layout, gather_entries
from dga_jax.ops.intervals import BlockSizes

__all__ = [
    "BlockSizes",
    "DGAConfig",
    "DGALayout",
    "dense_attention",
    "dga_attention",
    "dga_layout",
    "gather_entries",
]
__version__ = "0.1.0"
