"""Flax NNX LLaMA-style decoder into which DGA plugs (no kernel code here: see `dga_jax.ops`)."""

from dga_jax.model.attention import DGAttention
from dga_jax.model.config import ModelConfig, RopeScaling
from dga_jax.model.llama import DecoderLayer, Llama

__all__ = ["DGAttention", "DecoderLayer", "Llama", "ModelConfig", "RopeScaling"]
