"""The Hugging Face config mapping: transformers' defaults, round trips, errors by HF key."""

from __future__ import annotations

import json
import re

import pytest

from dga_jax.errors import ConfigError
from dga_jax.model.config import ModelConfig, RopeScaling
from dga_jax.model.hf_config import config_to_hf, with_generation_token_ids


def test_absent_hf_fields_take_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    hf = config_to_hf(ModelConfig.preset("tiny"))
    absent = ("max_position_embeddings", "rms_norm_eps", "rope_theta", "num_key_value_heads")
    hf = {key: value for key, value in hf.items() if key not in (*absent, "head_dim")}
    theirs = transformers.LlamaConfig.from_dict(hf)
    ours = ModelConfig.from_hf(hf)
    assert (ours.max_position, ours.norm_eps, ours.rope_theta, ours.num_kv_heads) == (
        theirs.max_position_embeddings,
        theirs.rms_norm_eps,
        theirs.rope_parameters["rope_theta"],
        theirs.num_key_value_heads,
    )
    assert (ours.head_dim, ours.tie_embeddings) == (theirs.head_dim, theirs.tie_word_embeddings)


def test_generation_config_adds_its_token_ids():
    config = ModelConfig.preset("tiny", bos_token_id=1, eos_token_ids=(9,))
    merged = with_generation_token_ids(
        config, {"bos_token_id": 2, "eos_token_id": [7, 9], "pad_token_id": 3}
    )
    assert (merged.bos_token_id, merged.eos_token_ids, merged.pad_token_id) == (1, (7, 9), 3)
    assert with_generation_token_ids(config, {"eos_token_id": 4}).eos_token_ids == (4, 9)
    assert with_generation_token_ids(config, {"do_sample": True}) == config
    with pytest.raises(ConfigError, match=r"^eos_token_id must be int, got str 'x'$"):
        with_generation_token_ids(config, {"eos_token_id": ["x"]})
    with pytest.raises(ConfigError, match="generation config must be a JSON object"):
        with_generation_token_ids(config, [7])


@pytest.mark.parametrize(
    "rope",
    [
        RopeScaling(),
        RopeScaling("linear", 2.0),
        RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        # within max_position (a longer YaRN context extends it on reading: test_hf_qwen2)
        RopeScaling("yarn", 16.0, original_max_position=1024),
        RopeScaling(
            "yarn",
            4.0,
            original_max_position=64,
            beta_fast=8.0,
            beta_slow=0.5,
            attention_factor=0.9,
            truncate=False,
        ),
    ],
    ids=["none", "linear", "llama3", "yarn", "yarn_all_fields"],
)
def test_hf_config_round_trip(tmp_path, rope):
    config = ModelConfig.preset("tiny", rope_scaling=rope, tie_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(config)))
    # How the layers run (scan_layers: the tiny preset unrolls them) is not HF's to carry.
    assert ModelConfig.from_hf(tmp_path, scan_layers=config.scan_layers) == config


@pytest.mark.parametrize("qkv_bias, model_type", [(False, "mistral"), (True, "qwen2")])
def test_hf_config_round_trip_keeps_the_sliding_window(qkv_bias, model_type):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig.preset("tiny", qkv_bias=qkv_bias, sliding_window=64)
    hf = config_to_hf(config)
    assert hf["model_type"] == model_type
    assert ModelConfig.from_hf(hf, scan_layers=config.scan_layers) == config
    theirs = transformers.AutoConfig.for_model(**hf)  # every layer slides in transformers too
    assert theirs.sliding_window == 64
    if model_type == "qwen2":
        assert theirs.layer_types == ["sliding_attention"] * config.num_layers


def test_unsupported_hf_architecture_is_rejected():
    hf = config_to_hf(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf({**hf, "architectures": ["GemmaForCausalLM"], "model_type": "gemma"})
    with pytest.raises(ValueError, match="unsupported architecture"):  # the pair must agree
        ModelConfig.from_hf({**hf, "model_type": "mistral"})
    with pytest.raises(ValueError, match=r"^unsupported rope_scaling\.rope_type 'proportional'"):
        ModelConfig.from_hf({**hf, "rope_scaling": {"rope_type": "proportional", "factor": 2.0}})


def test_transformers5_rope_parameters_are_read():
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ).to_dict()
    config = ModelConfig.from_hf(hf)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)


_LLAMA3_HF_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "changes, match",
    [
        # bool("false") was True: a silently tied LM head
        ({"tie_word_embeddings": "false"}, r"^tie_word_embeddings must be bool, got str 'false'$"),
        # its first letter 'L' was checked: "unsupported architecture LlamaForCausalLM"
        ({"architectures": "LlamaForCausalLM"}, r"^architectures must be a tuple, got 'Llama"),
        # named model.max_position / model.norm_eps, which the file does not have
        ({"max_position_embeddings": None}, r"^max_position_embeddings must be int, got NoneType"),
        ({"rms_norm_eps": None}, r"^rms_norm_eps must be float, got NoneType None$"),
        ({"num_key_value_heads": "2"}, r"^num_key_value_heads must be int, got str '2'$"),
        # TypeError (unhashable) and ZeroDivisionError tracebacks
        ({"architectures": None, "model_type": ["llama"]}, r"^model_type must be str, got list"),
        (
            {"num_attention_heads": 0, "head_dim": None},
            r"^num_attention_heads must be at least 1, got 0$",
        ),
        # TypeError / AttributeError tracebacks, which read_hf_config does not catch
        ({"rope_theta": None}, r"^rope_theta must be float, got NoneType None$"),
        ({"rope_parameters": {"rope_theta": None}}, r"^rope_parameters\.rope_theta must be float"),
        (
            {"rope_scaling": ["linear", 2.0]},
            r"^rope_scaling must be a dict, got \['linear', 2\.0\]$",
        ),
        (
            {"rope_scaling": {**_LLAMA3_HF_ROPE, "original_max_position_embeddings": None}},
            r"^rope_scaling\.original_max_position_embeddings must be int, got NoneType None$",
        ),
        (
            {"rope_scaling": {"type": "linear", "factor": "x"}},
            r"^rope_scaling\.factor must be float",
        ),
    ],
)
def test_bad_hf_values_are_rejected_by_their_hf_key(changes, match):
    hf = config_to_hf(ModelConfig.preset("tiny"))
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf({**hf, **changes})


def test_null_hf_kv_heads_and_head_dim_take_transformers_defaults():
    hf = {**config_to_hf(ModelConfig.preset("tiny")), "num_key_value_heads": None, "head_dim": None}
    config = ModelConfig.from_hf(hf)
    assert (config.num_kv_heads, config.head_dim) == (config.num_heads, 128 // config.num_heads)


def test_nan_rope_factor_is_rejected():
    """NaN passed `factor <= 0` and made every logit NaN (JSON's NaN parses in Python)."""
    with pytest.raises(ValueError, match=r"^rope_scaling\.factor must be > 0, got nan$"):
        RopeScaling("linear", float("nan"))
    hf = config_to_hf(ModelConfig.preset("tiny"))
    rope = json.loads('{"rope_type": "linear", "factor": NaN}')
    with pytest.raises(ValueError, match=r"^rope_scaling\.factor must be > 0, got nan$"):
        ModelConfig.from_hf({**hf, "rope_scaling": rope})


def test_hf_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    named = re.escape(str(path))
    path.write_text('{"vocab_size": 32000, "hidden_')  # a truncated download
    with pytest.raises(ConfigError, match=rf"^{named} is not valid JSON: Unterminated string"):
        ModelConfig.from_hf(tmp_path)
    path.write_text('{"vocab_size": 32000}')
    with pytest.raises(ConfigError, match=rf"^{named}: HF config key\(s\) \['hidden_size'"):
        ModelConfig.from_hf(path)
