"""The model's one frozen config, its presets, and its construction from a Hugging Face config.

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
# What `attention_impl` may name for each kind (MInference runs its own XLA walk only).
ATTENTION_IMPLS = {
    "dense": DENSE_IMPLEMENTATIONS,
    "dga": DGA_IMPLEMENTATIONS,
    "streaming_llm": INTERVAL_IMPLEMENTATIONS,
    "lm_infinite": INTERVAL_IMPLEMENTATIONS,
    "minference": ("xla",),
}
ROPE_KINDS = ("none", "linear", "llama3")
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
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: none, linear (positions / factor) or llama3 (per-band)."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"rope_scaling.kind must be one of {ROPE_KINDS}, got {self.kind!r}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


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
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    attention: str = "dense"
    dga: DGAConfig = DGAConfig()
    streaming_llm: StreamingLLMConfig = StreamingLLMConfig()
    lm_infinite: LMInfiniteConfig = LMInfiniteConfig()
    minference: MInferenceConfig = MInferenceConfig()
    attention_impl: str | None = None  # None: the library's default for the backend
    context_parallel: str = "auto"  # how a sequence split over the `seq` mesh axis is attended
    context_order: str = "contiguous"  # or "zigzag": rows of a split sequence in zig-zag order
    remat: str = "none"
    # Special token ids, carried from a HF config to its export; they fix no parameter's shape.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] | None = None  # HF's eos_token_id: one id or several
    pad_token_id: int | None = None

    def __post_init__(self):
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
        # DGA's "reference" (the ops' O(L^2) oracle) selects by itself: it cannot take the
        # layout prefill builds once for the attention and the cache, nor padded rows.
        allowed = tuple(impl for impl in ATTENTION_IMPLS[self.attention] if impl != "reference")
        if self.attention_impl is not None and self.attention_impl not in allowed:
            raise ValueError(
                f"model.attention_impl={self.attention_impl!r}: attention={self.attention!r} "
                f"runs one of {allowed}, or None (the library's default)"
            )
        if self.attention == "minference":
            self.minference.check_fits(self.max_position)

    @property
    def sinks(self) -> SinkConfig | None:
        """The settings of a first-tokens-and-window kind (StreamingLLM, LM-Infinite), else None."""
        return getattr(self, self.attention) if self.attention in SINK_KINDS else None

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
        """From a Hugging Face LLaMA `config.json` (a dict, the file, or its directory)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        return hf_to_config(config).replace(**changes)


SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM",)
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
_HF_LLAMA3_ROPE = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def hf_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Maps the fields of a HF `LlamaConfig` dict; other architectures, and a missing or
    unsupported field, raise a `ConfigError` naming the key."""
    if not isinstance(hf, dict):
        raise ConfigError(f"a HF config must be a JSON object, got {type(hf).__name__}")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or archs[0] not in SUPPORTED_HF_ARCHITECTURES:
        raise ConfigError(
            f"unsupported architecture {archs} (model_type "
            f"{hf.get('model_type')!r}); supported: {SUPPORTED_HF_ARCHITECTURES}"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("unsupported LLaMA variant: attention_bias / mlp_bias are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; LLaMA uses 'silu'")
    _require(hf, _HF_REQUIRED, "")
    for key in _HF_REQUIRED:
        strict.check(key, hf[key], int)
    heads = hf["num_attention_heads"]
    # transformers >= 5 nests rope_theta and the scaling in `rope_parameters`.
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=_hf_rope_scaling(hf),
        max_position=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_hf_token_ids(hf),
    )


def _require(values: dict[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    """A `ConfigError` naming the `keys` missing from (the `prefix` section of) a HF config."""
    missing = [prefix + key for key in keys if key not in values]
    if missing:
        raise ConfigError(f"HF config key(s) {missing} missing")


def _hf_rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    section = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    scaling = hf.get(section)
    if not scaling:
        return RopeScaling()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        _require(scaling, ("factor",), section + ".")
        return RopeScaling("linear", float(scaling["factor"]))
    if kind == "llama3":
        _require(scaling, _HF_LLAMA3_ROPE, section + ".")
        return RopeScaling(
            "llama3",
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
    raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: linear, llama3")


def _hf_token_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's token id fields from HF's bos/eos/pad_token_id (eos: an id or a list)."""
    eos = hf.get("eos_token_id")
    eos = eos if isinstance(eos, list) or eos is None else [eos]
    return {
        "bos_token_id": strict.check("bos_token_id", hf.get("bos_token_id"), int | None),
        "eos_token_ids": strict.check("eos_token_id", eos, tuple[int, ...] | None),
        "pad_token_id": strict.check("pad_token_id", hf.get("pad_token_id"), int | None),
    }


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` fields of a config (for export); unset token ids are left out, so
    transformers' own defaults apply as they did to a source config without them."""
    scaling = config.rope_scaling
    rope = None
    if scaling.kind == "linear":
        rope = {"rope_type": "linear", "factor": scaling.factor}
    elif scaling.kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope,
        "max_position_embeddings": config.max_position,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": config.param_dtype,
        **hf_token_ids(config),
    }


def hf_token_ids(config: ModelConfig) -> dict[str, Any]:
    """HF's bos/eos/pad_token_id of a config, the unset ones left out (eos: an id or a list)."""
    eos = config.eos_token_ids
    if eos is not None:
        eos = eos[0] if len(eos) == 1 else list(eos)
    ids = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None}


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
    ),
}
