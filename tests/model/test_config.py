"""Model config: presets and strict construction."""

from __future__ import annotations

import pytest

from dga_jax.errors import ConfigError
from dga_jax.model.config import (
    ATTENTION_IMPLS,
    PRESETS,
    ModelConfig,
    RopeScaling,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name):
    config = ModelConfig.preset(name)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(ModelConfig.from_dict(config.to_dict()))


def test_llama2_7b_has_the_paper_shapes():
    c = ModelConfig.preset("llama2_7b")
    assert (c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        4096,
        32,
        32,
        32,
        128,
    )
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.norm_eps) == (
        11008,
        32000,
        10000.0,
        1e-5,
    )
    params = (
        c.vocab_size * c.d_model * 2
        + c.num_layers
        * (4 * c.d_model * c.d_model + 3 * c.d_model * c.intermediate_size + 2 * c.d_model)
        + c.d_model
    )
    assert abs(params / 1e9 - 6.74) < 0.01


def test_llama3_8b_is_gqa_with_llama3_rope():
    c = ModelConfig.preset("llama3_8b")
    assert c.num_heads // c.num_kv_heads == 4
    assert c.rope_scaling.kind == "llama3"


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"model\.d_modle"):
        ModelConfig.from_dict({"d_modle": 8})
    with pytest.raises(ValueError, match=r"model\.dga\.gamma"):
        ModelConfig.from_dict({"dga": {"gamma": 0.1}})
    with pytest.raises(ValueError, match=r"model\.rope_scaling\.scale"):
        ModelConfig.from_dict({"rope_scaling": {"scale": 2.0}})


@pytest.mark.parametrize(
    "values, match",
    [
        ({"num_layers": "2"}, r"^model\.num_layers must be int, got str '2'$"),
        ({"norm_eps": "1e-5"}, r"^model\.norm_eps must be float, got str '1e-5'$"),
        ({"rope_theta": True}, r"^model\.rope_theta must be float, got bool True$"),
        ({"tie_embeddings": 1}, r"^model\.tie_embeddings must be bool, got int 1$"),
        ({"attention_impl": 3}, r"^model\.attention_impl must be str, got int 3$"),
        ({"dga": {"group_size": "8"}}, r"^model\.dga\.group_size must be int, got str '8'$"),
        ({"rope_scaling": {"factor": "2"}}, r"^model\.rope_scaling\.factor must be float"),
    ],
)
def test_wrong_types_are_rejected_by_name(values, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(values)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"dga": {"group_size": 0}}, r"^dga\.group_size must be an int >= 1, got 0$"),
        ({"dga": {"focal_ratio": 2.0}}, r"^dga\.focal_ratio must be a number in \[0, 1\]"),
        ({"dga": {"selection": "local"}}, r"^dga\.selection must be one of"),
    ],
)
def test_bad_dga_values_name_the_field_path(values, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(values)


def test_ints_are_floats_and_none_is_the_default_impl():
    config = ModelConfig.from_dict({"norm_eps": 1, "attention_impl": None})
    assert config.norm_eps == 1.0 and type(config.norm_eps) is float
    assert config.attention_impl is None


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_heads=6, num_kv_heads=4), "num_heads"),
        (dict(attention="sparse"), "attention"),
        (dict(remat="some"), "remat"),
        (dict(dtype="float8"), "dtype"),
        (dict(d_model=0), "d_model"),
        (dict(attention="minference", attention_impl="pallas_gpu"), "attention_impl"),
        (dict(attention="dga", attention_impl="bogus"), "attention_impl='bogus'"),
        (dict(attention="dense", attention_impl="pallas_gpu"), "attention='dense'"),
        (dict(attention="streaming_llm", attention_impl="cudnn"), "attention_impl"),
        (dict(head_dim=7), r"^model\.head_dim must be even .*got 7$"),
        # the reference selects by itself: prefill's layout and padded rows would be ignored
        (dict(attention="dga", attention_impl="reference"), r"attention_impl='reference'.*\('xla'"),
        # NaN logits otherwise
        (dict(rope_theta=0.0), r"^model\.rope_theta must be a number > 0, got 0\.0$"),
        (dict(rope_theta=float("nan")), r"^model\.rope_theta must be a number > 0"),
        (dict(norm_eps=-1e-5), r"^model\.norm_eps must be a number >= 0"),
        (dict(tie_embeddings="false"), r"^model\.tie_embeddings must be a bool, got 'false'$"),
        # a list would make the config unhashable
        (dict(eos_token_ids=[1, 2]), r"^model\.eos_token_ids must be a tuple of ints"),
        (dict(bos_token_id="1"), r"^model\.bos_token_id must be an int or None"),
        # plain dicts crashed inside the model ('dict' object has no attribute 'kind')
        (dict(rope_scaling={"kind": "linear"}), r"^model\.rope_scaling must be a RopeScaling"),
        (dict(dga={"group_size": 8}), r"^model\.dga must be a DGAConfig, got dict"),
        (dict(streaming_llm={"start_size": 4}), r"^model\.streaming_llm must be a Streaming"),
        (dict(lm_infinite={"local_size": 8}), r"^model\.lm_infinite must be a LMInfinite"),
        (dict(attention="minference", minference={}), r"^model\.minference must be a MInf"),
        (dict(sliding_window=0), r"^model\.sliding_window must be an int >= 1 or None, got 0$"),
        (dict(sliding_window=4.0), r"^model\.sliding_window must be an int >= 1"),
        # DGA and the baselines replace dense attention: a window there would be ignored
        (dict(attention="dga", sliding_window=8), r"sliding_window=8 is dense attention's"),
        (dict(attention="lm_infinite", sliding_window=8), r"attention='lm_infinite' replaces"),
    ],
)
def test_bad_values_are_rejected_by_name(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("tiny", **changes)


@pytest.mark.parametrize(
    "bands, match",
    [
        ((0.0, 4.0, 64), r"^rope_scaling\.low_freq_factor must be > 0, got 0\.0$"),  # ZeroDivision
        ((4.0, 1.0, 64), r"^rope_scaling\.high_freq_factor=1\.0 must be greater than"),
        ((1.0, 4.0, 0), r"^rope_scaling\.original_max_position must be a positive int, got 0$"),
    ],
)
def test_bad_llama3_rope_bands_are_rejected_by_name(bands, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling("llama3", 8.0, *bands)


def test_attention_impls_lists_what_the_model_runs():
    for kind, impls in ATTENTION_IMPLS.items():
        for impl in impls:
            assert ModelConfig.preset("tiny", attention=kind, attention_impl=impl).attention_impl
    assert "reference" not in ATTENTION_IMPLS["dga"]


@pytest.mark.parametrize("rotary_dim", [0, 3, 40, True, 8.0])
def test_rotary_dim_must_be_an_even_count_of_a_heads_channels(rotary_dim):
    with pytest.raises(
        ValueError, match=r"^model\.rotary_dim must be an even int in 2 \.\. head_d"
    ):
        ModelConfig.preset("tiny", rotary_dim=rotary_dim)


def test_rope_dim_is_rotary_dim_else_head_dim():
    assert ModelConfig.preset("tiny").rope_dim == 32
    assert ModelConfig.preset("tiny", rotary_dim=8).rope_dim == 8
