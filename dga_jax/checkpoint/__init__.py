"""Checkpoints: Orbax save / sharded load of a `Llama`, and Hugging Face conversion.

The conversion commands live in `dga_jax.checkpoint.convert` (`python -m` it).
"""

from dga_jax.checkpoint.hf import CheckpointError, read_hf
from dga_jax.checkpoint.hf_write import write_hf
from dga_jax.checkpoint.orbax_io import (
    abstract_model,
    load_config,
    load_model,
    read_param,
    save_model,
    save_params,
)

__all__ = [
    "CheckpointError",
    "abstract_model",
    "load_config",
    "load_model",
    "read_hf",
    "read_param",
    "save_model",
    "save_params",
    "write_hf",
]
