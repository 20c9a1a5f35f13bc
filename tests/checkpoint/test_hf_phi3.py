"""Phi-3 checkpoints: LLaMA in fused tensors (q, k, v in qkv_proj; gate, up in gate_up_proj),
a sliding window in every layer or none. They load with transformers' logits, decode as they
run whole, and export back as Phi3ForCausalLM in the fused tensors; what Phi-3 adds that we do
not compute, or what it cannot hold, is refused by name."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import dga_jax
from dga_jax.checkpoint import CheckpointError, load_config, load_model, read_hf
from dga_jax.checkpoint.hf import INDEX_FILE
from dga_jax.checkpoint.hf_write import write_hf
from dga_jax.errors import ConfigError
from dga_jax.model.config import ModelConfig
from dga_jax.model.hf_config import config_to_hf
from dga_jax.model.rope_scaling import RopeScaling
from tests.checkpoint.conftest import (
    _DEFAULTS,
    LOGIT_ATOL,
    assert_decodes_as_it_runs_whole,
    conversions,
    hf_logits,
    random_tokens,
    save_sharded,
    to_hf,
    to_orbax,
)
from tests.checkpoint.conftest import (
    converted_logits as _logits,
)

WINDOW = 5  # keys per query: shorter than the test sequences, so the window matters
# Phi3Config's token ids (pad and eos 32000) lie past the tiny vocabulary: nn.Embedding refuses
# a padding_idx there.
_PHI3_DEFAULTS = {**_DEFAULTS, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# LongRoPE as Phi-3-128K sets it, for head_dim 16 (8 divisors each) and an original context of
# 64 at the top level, where Phi3Config reads it; the test sequences (80) are past it.
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0, 2.5],
    "long_factor": [1.0, 1.3, 1.9, 2.8, 4.0, 6.5, 9.0, 12.0],
}
MODELS = {
    "gqa": dict(num_key_value_heads=2),
    "mha": dict(num_key_value_heads=4),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "sliding": dict(num_key_value_heads=2, sliding_window=WINDOW),
    # RoPE on the first half of each head's 16 channels (Phi-4-mini rotates 0.75 of 128)
    "partial": dict(num_key_value_heads=2, partial_rotary_factor=0.5),
}


def _phi3(**overrides) -> transformers.Phi3ForCausalLM:
    """A 2-layer float32 Phi-3 (d=64, 4 heads, I=96, V=128) with random weights, norms included."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**_PHI3_DEFAULTS, **overrides})
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    return model


def _phi3_config(**overrides) -> dict:
    """The config.json dict transformers saves for a tiny Phi-3."""
    return transformers.Phi3Config(**{**_PHI3_DEFAULTS, **overrides}).to_dict()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (transformers model, its Orbax conversion), built once per module."""
    return conversions(tmp_path_factory, lambda name: _phi3(**MODELS[name]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_phi3_checkpoints_give_transformers_logits(converted, name):
    model, ckpt = converted(name)
    tokens = random_tokens()
    diff = np.max(np.abs(_logits(ckpt, tokens) - hf_logits(model, tokens)))
    assert diff <= LOGIT_ATOL


def _swap_rows(weight: torch.Tensor, first: slice, second: slice) -> None:
    """Swaps two equally long row blocks of `weight` in place."""
    rows = weight[first].clone()
    weight[first] = weight[second]
    weight[second] = rows


@pytest.mark.parametrize("fused", ["qkv_proj", "gate_up_proj"])
def test_the_fused_split_matters_at_this_tolerance(fused):
    # k's and v's rows swapped, or gate's and up's: a split in the wrong order moves the logits
    # far past the tolerance, so the parity test above would see it.
    tokens, model, swapped = random_tokens(), _phi3(**MODELS["gqa"]), _phi3(**MODELS["gqa"])
    kv, inner = 2 * 16, _PHI3_DEFAULTS["intermediate_size"]  # 2 k/v heads of 16 channels
    blocks = {
        "qkv_proj": (slice(64, 64 + kv), slice(64 + kv, 64 + 2 * kv)),
        "gate_up_proj": (slice(0, inner), slice(inner, 2 * inner)),
    }
    with torch.no_grad():
        for name, weight in swapped.named_parameters():
            if f".{fused}." in name:
                _swap_rows(weight, *blocks[fused])
    assert np.max(np.abs(hf_logits(swapped, tokens) - hf_logits(model, tokens))) > 100 * LOGIT_ATOL


def _weight_map(hf_dir) -> dict[str, str]:
    return json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]


@pytest.mark.parametrize("name", ["gqa", "tied", "sliding"])
def test_export_loads_in_transformers_as_phi3_in_fused_tensors(converted, name, tmp_path):
    model, ckpt = converted(name)
    source = ckpt.parent / "hf"
    assert load_config(ckpt).hf_model_type == "phi3"
    to_hf(ckpt, tmp_path / "hf")
    assert set(_weight_map(tmp_path / "hf")) == set(_weight_map(source))
    assert "model.layers.1.self_attn.qkv_proj.weight" in _weight_map(tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "Phi3ForCausalLM"
    assert exported.config.sliding_window == model.config.sliding_window
    tokens = random_tokens()
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(model, tokens))


@pytest.mark.parametrize("name", ["gqa", "sliding"])
def test_a_phi3_decodes_as_it_runs_whole(converted, name):
    assert_decodes_as_it_runs_whole(load_model(converted(name)[1], param_dtype="float32"))


def test_longrope_phi3_gives_transformers_logits_past_the_original_context(tmp_path):
    model = _phi3(num_key_value_heads=2, rope_scaling=LONGROPE, original_max_position_embeddings=64)
    to_orbax(save_sharded(model, tmp_path / "hf"), tmp_path / "orbax")
    assert load_config(tmp_path / "orbax").rope_scaling.kind == "longrope"
    tokens = random_tokens()  # 80 positions: past 64, where the long factors rotate
    diff = np.max(np.abs(_logits(tmp_path / "orbax", tokens) - hf_logits(model, tokens)))
    assert diff <= LOGIT_ATOL
    to_hf(tmp_path / "orbax", tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(model, tokens))


def test_phi3_mini_128k_as_it_ships_loads():
    # Its config.json: longrope under the legacy key "type", a window (262144) larger than its
    # context, kept as given; head_dim 96 (48 divisors each).
    hf = _phi3_config(
        hidden_size=3072,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        sliding_window=262144,
    )
    hf["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}
    config = ModelConfig.from_hf(hf)
    assert (config.hf_model_type, config.sliding_window) == ("phi3", 262144)
    assert config.rope_scaling.kind == "longrope"
    assert config.rope_scaling.original_max_position == 4096


@pytest.mark.parametrize("window", [None, WINDOW])
def test_a_phi3_config_round_trips(window):
    config = ModelConfig.from_hf(_phi3_config(num_key_value_heads=2, sliding_window=window))
    assert config.hf_model_type == "phi3" and config.sliding_window == window
    assert ModelConfig.from_hf(config_to_hf(config)) == config


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            {"partial_rotary_factor": 0.1, "rope_parameters": {"rope_type": "default"}},
            r"^partial_rotary_factor 0\.1 rotates 1 of head_dim=16 channels; RoPE needs an even",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1.5}},
            r"^rope_parameters\.partial_rotary_factor 1\.5 rotates 24 of head_dim=16",
        ),
        ({"hidden_act": "gelu"}, r"^unsupported hidden_act 'gelu'"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            r"^unsupported RoPE type 'linear' .* for a Phi-3",
        ),
    ],
    ids=["partial_rotary_factor", "rope_partial_rotary_factor", "hidden_act", "linear_rope"],
)
def test_what_phi3_adds_to_llama_is_refused_naming_it(changes, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf({**_phi3_config(), **changes})


@pytest.mark.parametrize("key", ["max_position_embeddings", "rms_norm_eps"])
def test_phi3_keys_whose_defaults_differ_from_llama_must_be_there(key):
    hf = _phi3_config()
    hf.pop(key)
    with pytest.raises(ConfigError, match=rf"\['{key}'\] missing"):
        ModelConfig.from_hf(hf)


def test_longrope_needs_the_top_level_original_context():
    # Phi3Config reads it there before the RoPE section's, 4096 where absent.
    hf = _phi3_config(rope_scaling=LONGROPE, original_max_position_embeddings=64)
    hf.pop("original_max_position_embeddings")
    hf["rope_parameters"]["original_max_position_embeddings"] = 64
    with pytest.raises(ConfigError, match=r"\['original_max_position_embeddings'\] missing"):
        ModelConfig.from_hf(hf)


def test_an_absent_phi3_window_is_none():
    hf = _phi3_config()
    hf.pop("sliding_window")
    assert ModelConfig.from_hf(hf).sliding_window is None


def test_a_fused_tensor_of_the_wrong_shape_names_it_and_its_rows(converted, tmp_path):
    # config.json claims 4 k/v heads; the checkpoint's qkv_proj holds 2.
    model, _ = converted("gqa")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    name = re.escape("'model.layers.0.self_attn.qkv_proj.weight'")
    match = name + r" .* has shape \(128, 64\); expected \(192, 64\) .*q, k, v: 64 \+ 64 \+ 64"
    with pytest.raises(CheckpointError, match=match):
        read_hf(tmp_path)


def _refuses_before_writing(out, config: ModelConfig, match: str) -> None:
    """`write_hf` of `config` raises a ConfigError matching `match` before reading a tensor."""

    def read_param(path):
        raise AssertionError(f"read {path} before refusing")

    with pytest.raises(ConfigError, match=match):
        write_hf(out, config, read_param, dtype="float32", max_shard_size=2**20)
    assert not out.exists()


LONG_ROPE_32 = RopeScaling(
    "longrope",
    original_max_position=64,
    short_factor=(1.0,) * 16,
    long_factor=(2.0,) * 16,
)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"qkv_bias": True}, r"model\.qkv_bias=True and model\.o_bias=False: Phi-3 has no"),
        (
            {"qkv_bias": True, "o_bias": True},
            r"model\.qkv_bias=True and model\.o_bias=True: Phi-3 has no",
        ),
        ({"rope_scaling": RopeScaling("linear", 2.0)}, r"rope_scaling\.kind='linear'"),
        (  # Phi3Config counts longrope's factors by hidden_size / heads (16), not head_dim
            {"num_heads": 8, "num_kv_heads": 2, "rope_scaling": LONG_ROPE_32},
            r"longrope and model\.head_dim=32: Phi3Config sizes .* hidden_size / heads = 16",
        ),
    ],
    ids=["qkv_bias", "attention_bias", "linear_rope", "longrope_head_dim"],
)
def test_what_phi3_cannot_hold_is_refused_at_export(tmp_path, changes, match):
    config = ModelConfig.preset("tiny", hf_model_type="phi3", **changes)
    _refuses_before_writing(tmp_path / "hf", config, match)


def test_hf_model_type_names_a_known_layout():
    with pytest.raises(ValueError, match=r"^model\.hf_model_type must be None or one of"):
        ModelConfig.preset("tiny", hf_model_type="llama")


def test_partial_rope_reads_as_transformers_reads_it():
    """partial_rotary_factor: the RoPE section's before the top level's (Phi3Config's order),
    int(head_dim * factor) channels; exported back as the factor."""
    hf = _phi3_config(partial_rotary_factor=0.75)
    assert hf["rope_parameters"]["partial_rotary_factor"] == 0.75
    config = ModelConfig.from_hf(hf)
    assert (config.rotary_dim, config.rope_dim) == (12, 12)
    assert ModelConfig.from_hf({**hf, "partial_rotary_factor": 0.25}).rotary_dim == 12
    del hf["rope_parameters"]["partial_rotary_factor"]
    assert ModelConfig.from_hf({**hf, "partial_rotary_factor": 0.25}).rotary_dim == 4
    assert config_to_hf(config)["partial_rotary_factor"] == 0.75
    assert ModelConfig.from_hf(config_to_hf(config)) == config


def test_partial_rope_matters_at_this_tolerance(converted):
    _, ckpt = converted("partial")
    tokens = random_tokens()
    whole = np.asarray(load_model(ckpt, param_dtype="float32", rotary_dim=None)(tokens))
    assert np.max(np.abs(whole - _logits(ckpt, tokens))) > 100 * LOGIT_ATOL


def test_longrope_on_part_of_each_head_gives_transformers_logits(tmp_path):
    """Phi-4-mini's form: longrope's divisors, one per rotated frequency (8 channels: 4)."""
    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.5, 2.0]}
    rope["long_factor"] = [1.0, 2.0, 4.0, 8.0]
    model = _phi3(
        num_key_value_heads=2,
        rope_scaling=rope,
        original_max_position_embeddings=64,
        partial_rotary_factor=0.5,
    )
    to_orbax(save_sharded(model, tmp_path / "hf"), tmp_path / "orbax")
    assert load_config(tmp_path / "orbax").rotary_dim == 8
    tokens = random_tokens()
    diff = np.max(np.abs(_logits(tmp_path / "orbax", tokens) - hf_logits(model, tokens)))
    assert diff <= LOGIT_ATOL


def test_llama_rotates_every_channel():
    """transformers' LLaMA, Mistral and Qwen2 rotate whole heads: a factor there is refused, and
    a rotary_dim exports as a Phi-3 only."""
    hf = {**_phi3_config(), "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    with pytest.raises(ConfigError, match=r"partial_rotary_factor 0\.5 for model_type 'llama'"):
        ModelConfig.from_hf(
            {**hf, "rope_parameters": {**hf["rope_parameters"], "partial_rotary_factor": 0.5}}
        )
    with pytest.raises(ConfigError, match=r"model\.rotary_dim=16 .* but Phi-3's"):
        config_to_hf(ModelConfig.preset("tiny", rotary_dim=16))


def test_partial_rope_comes_from_the_section_transformers_reads():
    """A non-empty rope_scaling is the section Phi3Config reads, rope_parameters then ignored;
    a factor giving the whole head is no partial RoPE."""
    hf = _phi3_config(partial_rotary_factor=0.5)
    hf["rope_scaling"] = {"rope_type": "default", "partial_rotary_factor": 1.0}
    theirs = transformers.Phi3Config.from_dict(hf)
    assert theirs.rope_parameters["partial_rotary_factor"] == 1.0
    assert ModelConfig.from_hf(hf).rotary_dim is None
    del hf["rope_scaling"]
    assert ModelConfig.from_hf(hf).rotary_dim == 8
    config = ModelConfig.preset("tiny", rotary_dim=32)  # head_dim 32: the whole head
    assert config_to_hf(config)["model_type"] == "llama"


def _greedy_without_switch(model, prompt: np.ndarray, new: int) -> list[int]:
    """Greedy decoding by prefill and decode_step alone: keys cached before the original
    context keep their short factors (what `generate` did before it switched)."""
    logits, caches = model.prefill(jnp.asarray(prompt[None]), len(prompt) + new, last_only=True)
    out = [int(np.argmax(logits[0, -1]))]
    for _ in range(new - 1):
        logits, caches = model.decode_step(jnp.asarray(out[-1:]), caches)
        out.append(int(np.argmax(logits[0])))
    return out


def test_longrope_phi3_generates_as_transformers_across_the_original_context(tmp_path):
    """transformers' Phi-3 `generate` runs the whole sequence again at the token that first
    passes the original context (64), with the long factors. Prompts of 50 and 60 tokens (they
    switch at different steps) generating 24 greedy tokens in one batch give transformers'
    tokens, each row as if alone; without the switch they would not."""
    model = _phi3(num_key_value_heads=2, rope_scaling=LONGROPE, original_max_position_embeddings=64)
    model.generation_config.eos_token_id = None  # 24 tokens whatever they are
    to_orbax(save_sharded(model, tmp_path / "hf"), tmp_path / "orbax")
    ours = load_model(tmp_path / "orbax", param_dtype="float32")
    prompts = [random_tokens(seed=1, batch=1, seq_len=n)[0] for n in (50, 60)]
    got = dga_jax.generate(ours, [p.tolist() for p in prompts], 24)
    unswitched = []
    for prompt, tokens in zip(prompts, got, strict=True):
        with torch.no_grad():
            theirs = model.generate(
                torch.from_numpy(prompt[None]).long(), max_new_tokens=24, do_sample=False
            )
        assert tokens == theirs[0, len(prompt) :].tolist()
        unswitched.append(_greedy_without_switch(ours, prompt, 24) != tokens)
    assert any(unswitched)
