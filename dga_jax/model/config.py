"""The model's one frozen config and its presets (`hf_config.py` maps a Hugging Face config).

Every field is a plain Python value, so a config hashes (it is a static argument of jitted
functions) and round-trips through `to_dict` / `from_dict`, which rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from dga_jax import strict
from dga_jax.errors import ConfigError
from dga_jax.model.rope_scaling import RopeScaling, check_rope_dims
from dga_jax.ops.dense import DENSE_IMPLEMENTATIONS
from dga_jax.ops.dga.api import IMPLEMENTATIONS as DGA_IMPLEMENTATIONS
from dga_jax.ops.dga.backends import INTERVAL_IMPLEMENTATIONS
from dga_jax.ops.dga.config import DGAConfig
from dga_jax.ops.dga.sharded import CONTEXT_ORDERS, STRATEGIES
from dga_jax.ops.minference import MInferenceConfig
from dga_jax.ops.sinks import LMInfiniteConfig, SinkConfig, StreamingLLMConfig

# The paper's baselines next to dense and DGA: each kind's settings are the field of its name.
ATTENTION_KINDS = ("dense", "dga", "streaming_llm", "lm_infinite", "minference")
SINK_KINDS = ("streaming_llm", "lm_infinite")
BASELINE_KINDS = (*SINK_KINDS, "minference")
# What `attention_impl` may name for each kind (MInference runs its own XLA walk only). DGA's
# "reference" (the ops' O(L^2) oracle) selects by itself: it cannot take the layout prefill builds
# once for the attention and the cache, nor padded rows.
ATTENTION_IMPLS = {
    "dense": DENSE_IMPLEMENTATIONS,
    "dga": tuple(impl for impl in DGA_IMPLEMENTATIONS if impl != "reference"),
    "streaming_llm": INTERVAL_IMPLEMENTATIONS,
    "lm_infinite": INTERVAL_IMPLEMENTATIONS,
    "minference": ("xla",),
}
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
# The fields that fix the parameters' shapes: checkpoints of a model agree on all of them.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "tie_embeddings",
    "qkv_bias",
    "o_bias",
    "qk_norm",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style decoder. Defaults are LLaMA2-7B's shapes (`docs/PAPER_NOTES.md`)."""

    vocab_size: int = 32000
    d_model: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position: int = 4096
    tie_embeddings: bool = False
    # Biases on the q, k, v projections (Qwen2's) and on the output one (with them: LLaMA's
    # attention_bias); LLaMA itself has none.
    qkv_bias: bool = False
    o_bias: bool = False
    # RMSNorm on each head of q and k after their projections, before RoPE (Qwen3's q_norm and
    # k_norm: a weight [head_dim] each per layer).
    qk_norm: bool = False
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    attention: str = "dense"
    # Dense attention's sliding window (Mistral's sliding_window): keys per query, its own
    # included; None: the whole past. The other kinds replace dense attention, window and all.
    sliding_window: int | None = None
    # The channels of each head RoPE rotates, the first ones (Phi-4-mini's partial_rotary_factor
    # 0.75: 96 of 128); the rest pass unrotated. None: all of them (`rope_dim`).
    rotary_dim: int | None = None
    dga: DGAConfig = DGAConfig()
    streaming_llm: StreamingLLMConfig = StreamingLLMConfig()
    lm_infinite: LMInfiniteConfig = LMInfiniteConfig()
    minference: MInferenceConfig = MInferenceConfig()
    attention_impl: str | None = None  # None: the library's default for the backend
    context_parallel: str = "auto"  # how a sequence split over the `seq` mesh axis is attended
    context_order: str = "contiguous"  # or "zigzag": rows of a split sequence in zig-zag order
    remat: str = "none"
    # False: the layers unrolled into one program instead of a scan over the stacked weights
    # (MaxText's scan_layers). Faster for a few layers (no stacked residuals to fill and slice);
    # compile time and program size grow with num_layers. The weights stay stacked either way.
    scan_layers: bool = True
    # Special token ids, carried from a HF config to its export; they fix no parameter's shape.
    bos_token_id: int | None = None
    # HF's eos_token_id: one id or several (a checkpoint's generation_config.json's included)
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # The HF model type to export as where the fields cannot tell it (`HF_MODEL_TYPES`): Phi-3
    # is LLaMA in fused tensors. None: LLaMA, Mistral, Qwen2 or Qwen3, as the fields say.
    hf_model_type: str | None = None

    def __post_init__(self):
        _check_nested_configs(self)
        _check_numbers(self)
        for name in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(
                f"model.head_dim must be even (RoPE rotates its channels in halves), "
                f"got {self.head_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={self.num_kv_heads}"
            )
        for name, allowed in (
            ("attention", ATTENTION_KINDS),
            ("context_parallel", STRATEGIES),
            ("context_order", CONTEXT_ORDERS),
            ("remat", REMAT_POLICIES),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        allowed = ATTENTION_IMPLS[self.attention]
        if self.attention_impl is not None and self.attention_impl not in allowed:
            raise ValueError(
                f"model.attention_impl={self.attention_impl!r}: attention={self.attention!r} "
                f"runs one of {allowed}, or None (the library's default)"
            )
        if self.attention == "minference":
            self.minference.check_fits(self.max_position)
        _check_sliding_window(self)
        check_rope_dims(self.head_dim, self.rotary_dim, self.rope_scaling)
        _check_hf_model_type(self)

    @property
    def rope_dim(self) -> int:
        """The channels of each head RoPE rotates: rotary_dim, else head_dim."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def sinks(self) -> SinkConfig | None:
        """The settings of a first-tokens-and-window kind (StreamingLLM, LM-Infinite), else None."""
        return getattr(self, self.attention) if self.attention in SINK_KINDS else None

    def positions_fit(self, count: int) -> bool:
        """Whether positions 0 .. count - 1 are the model's: within max_position, or any count
        for StreamingLLM, LM-Infinite and a sliding window within max_position, which cap every
        RoPE distance. Past it RoPE has no table to run out of: the model would extrapolate
        silently."""
        window = self.sliding_window
        capped = self.sinks is not None or (window is not None and window <= self.max_position)
        return capped or count <= self.max_position

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Builds a config from plain values; an unknown key is an error naming it."""
        return strict.build(cls, values, "model.")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name].replace(**changes)

    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | os.PathLike, **changes: Any) -> ModelConfig:
        """From a Hugging Face LLaMA `config.json` (a dict, the file, or its directory) alone;
        `dga_jax.checkpoint.hf.read_hf_config` adds a checkpoint's generation_config.json ids."""
        from dga_jax.model.hf_config import hf_to_config  # it imports this module

        if isinstance(config, dict):
            return hf_to_config(config).replace(**changes)
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            try:
                hf = json.load(f)
            except ValueError as error:  # JSONDecodeError, or bytes that are not text
                raise ConfigError(f"{path} is not valid JSON: {error}") from error
        try:
            mapped = hf_to_config(hf)
        except ValueError as error:  # a ConfigError of the mapping, or a rule of ModelConfig
            raise ConfigError(f"{path}: {error}") from error
        return mapped.replace(**changes)


# The fields holding another config, and its class; `from_dict` builds them from dicts.
NESTED_CONFIGS = (
    ("rope_scaling", RopeScaling),
    ("dga", DGAConfig),
    ("streaming_llm", StreamingLLMConfig),
    ("lm_infinite", LMInfiniteConfig),
    ("minference", MInferenceConfig),
)


def _check_nested_configs(config: ModelConfig) -> None:
    """A nested config given as anything but its class (a dict through `replace`, `preset` or
    `load_model`'s changes) is an error naming the field, not a crash in the model."""
    for name, kind in NESTED_CONFIGS:
        value = getattr(config, name)
        if not isinstance(value, kind):
            raise ValueError(
                f"model.{name} must be a {kind.__name__}, got {type(value).__name__} {value!r} "
                "(ModelConfig.from_dict builds one from a dict)"
            )


# The HF model types `hf_model_type` may name: those whose export layout differs from what the
# biases and the window of a LLaMA-style model imply.
HF_MODEL_TYPES = ("phi3",)


def _check_hf_model_type(config: ModelConfig) -> None:
    """hf_model_type: None, or a type whose export layout it names (`HF_MODEL_TYPES`)."""
    if config.hf_model_type is not None and config.hf_model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"model.hf_model_type must be None or one of {HF_MODEL_TYPES}, "
            f"got {config.hf_model_type!r}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(config: ModelConfig) -> None:
    """RoPE's base and RMSNorm's epsilon, which would make NaN logits, the bools (a "false"
    would be true), and the token ids, which must keep the config hashable."""
    for name in ("tie_embeddings", "qkv_bias", "o_bias", "qk_norm", "scan_layers"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"model.{name} must be a bool, got {getattr(config, name)!r}")
    if not (_is_number(config.rope_theta) and config.rope_theta > 0):
        raise ValueError(f"model.rope_theta must be a number > 0, got {config.rope_theta!r}")
    if not (_is_number(config.norm_eps) and config.norm_eps >= 0):
        raise ValueError(f"model.norm_eps must be a number >= 0, got {config.norm_eps!r}")
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(config, name)
        if value is not None and not _is_int(value):
            raise ValueError(f"model.{name} must be an int or None, got {value!r}")
    eos = config.eos_token_ids
    if eos is not None and not (isinstance(eos, tuple) and all(map(_is_int, eos))):
        raise ValueError(f"model.eos_token_ids must be a tuple of ints or None, got {eos!r}")


def _check_sliding_window(config: ModelConfig) -> None:
    """sliding_window: keys >= 1, on dense attention only (DGA and the baselines replace it)."""
    window = config.sliding_window
    if window is None:
        return
    if not _is_int(window) or window < 1:
        raise ValueError(f"model.sliding_window must be an int >= 1 or None, got {window!r}")
    if config.attention != "dense":
        raise ValueError(
            f"model.sliding_window={window} is dense attention's (Mistral's); "
            f"attention={config.attention!r} replaces it, window and all: set "
            "model.sliding_window=None to run this attention instead"
        )


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_ids", "pad_token_id")


def with_token_ids_of(config: ModelConfig, other: ModelConfig) -> ModelConfig:
    """`config` with `other`'s special token ids where it sets none (a run started from a
    converted checkpoint exports that checkpoint's ids)."""
    ids = {key: getattr(other, key) for key in TOKEN_ID_FIELDS if getattr(config, key) is None}
    return config.replace(**ids)


_LLAMA2_7B = ModelConfig()
PRESETS: dict[str, ModelConfig] = {
    "llama2_7b": _LLAMA2_7B,
    "llama2_13b": _LLAMA2_7B.replace(
        d_model=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824
    ),
    "llama3_8b": ModelConfig(
        vocab_size=128256,
        num_kv_heads=8,
        intermediate_size=14336,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        max_position=131072,
    ),
    "tiny": ModelConfig(
        vocab_size=512,
        d_model=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=344,
        max_position=32768,
        scan_layers=False,
    ),
}
