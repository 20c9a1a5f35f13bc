"""The RoPE section of a HF `config.json` (transformers' `rope_scaling` / `rope_parameters`) as
`RopeScaling` and rope_theta, and back; and the two readers every HF key goes through
(`hf_value`, `require`), which name the key in their errors. `hf_config.py` maps the rest.
"""

from __future__ import annotations

from typing import Any

from dga_jax import strict
from dga_jax.errors import ConfigError
from dga_jax.model.rope_scaling import RopeScaling, yarn_mscale

# original_max_position_embeddings may be absent: `_original_max_position`
_HF_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor")
# Phi-3's legacy names of longrope (transformers' Phi3Config maps them)
_PHI3_LONGROPE = ("su", "yarn")


def hf_value(
    values: dict[str, Any], key: str, kind: Any, default: Any = None, prefix: str = ""
) -> Any:
    """values[key] (`default` where absent) as the type `kind`: a `ConfigError` naming the HF key
    (under `prefix`) for a wrong one, e.g. null or a string ("false" would be a true bool)."""
    return strict.check(prefix + key, values.get(key, default), kind)


def rope_section(hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The RoPE section transformers reads, and its name: a non-empty `rope_scaling` (4.x's
    name), else `rope_parameters` (>= 5, which nests rope_theta there too)."""
    section = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    return section, hf_value(hf, section, dict[str, Any] | None) or {}


def hf_rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE section's rope_theta, else the top-level one, else 10000 (transformers' order)."""
    section, rope = rope_section(hf)
    if "rope_theta" in rope:
        return hf_value(rope, "rope_theta", float, prefix=section + ".")
    return hf_value(hf, "rope_theta", float, 10000.0)


def require(values: dict[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    """A `ConfigError` naming the `keys` missing from (the `prefix` section of) a HF config."""
    missing = [prefix + key for key in keys if key not in values]
    if missing:
        raise ConfigError(f"HF config key(s) {missing} missing")


def hf_rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    section, scaling = rope_section(hf)
    type_key = "rope_type" if "rope_type" in scaling else "type"
    kind = scaling.get(type_key, "default")
    if hf.get("model_type") == "phi3" and kind in _PHI3_LONGROPE:
        kind = "longrope"
    if kind == "default":
        return RopeScaling()
    prefix = section + "."
    if kind == "linear":
        require(scaling, ("factor",), prefix)
        return RopeScaling("linear", hf_value(scaling, "factor", float, prefix=prefix))
    if kind == "llama3":
        require(scaling, _HF_LLAMA3_ROPE, prefix)
        return RopeScaling(
            "llama3",
            hf_value(scaling, "factor", float, prefix=prefix),
            hf_value(scaling, "low_freq_factor", float, prefix=prefix),
            hf_value(scaling, "high_freq_factor", float, prefix=prefix),
            _original_max_position(hf, scaling, prefix),
        )
    if kind == "yarn":
        return _yarn_rope(hf, scaling, prefix)
    if kind == "dynamic":
        require(scaling, ("factor",), prefix)
        # transformers' dynamic NTK scales past max_position_embeddings itself
        factor = hf_value(scaling, "factor", float, prefix=prefix)
        original = _positive(hf_max_position(hf), "max_position_embeddings")
        return RopeScaling("dynamic", factor, original_max_position=original)
    if kind == "longrope":
        return _longrope(hf, scaling, prefix)
    raise ConfigError(
        f"unsupported {prefix}{type_key} {kind!r}; supported: default, linear, llama3, yarn, "
        "dynamic, longrope"
    )


def _original_max_position(hf: dict[str, Any], scaling: dict[str, Any], prefix: str) -> int:
    """llama3's, yarn's and longrope's original_max_position_embeddings where transformers'
    `standardize_rope_params` takes it: a top-level one (Phi-3's place) first, then the RoPE
    section's, else max_position_embeddings."""
    key = "original_max_position_embeddings"
    if key in hf:
        return _positive(hf_value(hf, key, int), key)
    return _positive(hf_value(scaling, key, int, hf_max_position(hf), prefix), prefix + key)


def _positive(value: int, key: str) -> int:
    """A context length, which the scalings divide by: >= 1, else a `ConfigError` naming it."""
    if value < 1:
        raise ConfigError(f"{key} must be >= 1 (a context length), got {value}")
    return value


def hf_max_position(hf: dict[str, Any]) -> int:
    return hf_value(hf, "max_position_embeddings", int, 2048)  # transformers' LlamaConfig's


def _yarn_rope(hf: dict[str, Any], scaling: dict[str, Any], prefix: str) -> RopeScaling:
    """transformers' `_compute_yarn_parameters`: a null factor is max_position_embeddings /
    original_max_position_embeddings; a null or zero beta takes its default (32, 1); a null
    truncate is false (`if truncate`), an absent one true."""
    require(scaling, ("factor",), prefix)
    original = _original_max_position(hf, scaling, prefix)
    factor = hf_value(scaling, "factor", float | None, prefix=prefix)
    if factor is None:
        factor = hf_max_position(hf) / original
    return RopeScaling(
        "yarn",
        factor,
        original_max_position=original,
        beta_fast=hf_value(scaling, "beta_fast", float | None, prefix=prefix) or 32.0,
        beta_slow=hf_value(scaling, "beta_slow", float | None, prefix=prefix) or 1.0,
        attention_factor=_yarn_attention_factor(scaling, prefix, factor),
        truncate=bool(hf_value(scaling, "truncate", bool | None, True, prefix)),
    )


def _longrope(hf: dict[str, Any], scaling: dict[str, Any], prefix: str) -> RopeScaling:
    """transformers' `_compute_longrope_parameters`: a null or absent factor is
    max_position_embeddings / original_max_position_embeddings (Phi-3's), a null attention
    factor LongRoPE's default from it."""
    require(scaling, ("short_factor", "long_factor"), prefix)
    original = _original_max_position(hf, scaling, prefix)
    factor = hf_value(scaling, "factor", float | None, prefix=prefix)
    return RopeScaling(
        "longrope",
        hf_max_position(hf) / original if factor is None else factor,
        original_max_position=original,
        attention_factor=hf_value(scaling, "attention_factor", float | None, prefix=prefix),
        short_factor=hf_value(scaling, "short_factor", tuple[float, ...], prefix=prefix),
        long_factor=hf_value(scaling, "long_factor", tuple[float, ...], prefix=prefix),
    )


def _yarn_attention_factor(scaling: dict[str, Any], prefix: str, factor: float) -> float | None:
    """attention_factor where set; else, where mscale and mscale_all_dim are both set and not
    zero, the ratio of their YaRN scales (DeepSeek's); else None: YaRN's default from factor."""
    attention_factor = hf_value(scaling, "attention_factor", float | None, prefix=prefix)
    mscale = hf_value(scaling, "mscale", float | None, prefix=prefix)
    mscale_all_dim = hf_value(scaling, "mscale_all_dim", float | None, prefix=prefix)
    if attention_factor is not None or not (mscale and mscale_all_dim):
        return attention_factor
    numerator, denominator = yarn_mscale(factor, mscale), yarn_mscale(factor, mscale_all_dim)
    if not (numerator > 0 and denominator > 0):
        raise ConfigError(
            f"{prefix}mscale={mscale} and {prefix}mscale_all_dim={mscale_all_dim} give YaRN an "
            f"attention factor of {numerator} / {denominator}: both scales "
            "(0.1 * mscale * ln(factor) + 1) must be > 0"
        )
    return numerator / denominator


def rope_to_hf(scaling: RopeScaling) -> dict[str, Any] | None:
    """The HF `rope_scaling` section of a scaling (None: no scaling)."""
    if scaling.kind == "none":
        return None
    rope = {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.kind == "llama3":
        rope["low_freq_factor"] = scaling.low_freq_factor
        rope["high_freq_factor"] = scaling.high_freq_factor
    if scaling.kind in ("llama3", "yarn", "longrope"):
        rope["original_max_position_embeddings"] = scaling.original_max_position
    if scaling.kind == "yarn":
        rope.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow)
        rope["truncate"] = scaling.truncate
    if scaling.kind == "longrope":
        rope["short_factor"] = list(scaling.short_factor)
        rope["long_factor"] = list(scaling.long_factor)
    if scaling.kind in ("yarn", "longrope") and scaling.attention_factor is not None:
        rope["attention_factor"] = scaling.attention_factor
    return rope
