"""Dynamic Group Attention: config, layout, reference and implementations."""

from dga_jax.ops.dga.api import IMPLEMENTATIONS, dga_attention
from dga_jax.ops.dga.config import DGAConfig, LayoutSizes
from dga_jax.ops.dga.entries import gather_entries
from dga_jax.ops.dga.layout import DGALayout, dga_layout, layout_block_ranges

__all__ = [
    "IMPLEMENTATIONS",
    "DGAConfig",
    "DGALayout",
    "LayoutSizes",
    "dga_attention",
    "dga_layout",
    "gather_entries",
    "layout_block_ranges",
]
