"""Orbax save / load of a `Llama`: round trips, config changes, abstract targets."""

from __future__ import annotations

import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from dga_jax import Llama
from dga_jax.checkpoint import (
    CheckpointError,
    abstract_model,
    load_config,
    load_model,
    read_param,
    save_model,
    save_params,
)
from dga_jax.checkpoint.hf_weights import param_shapes
from dga_jax.checkpoint.orbax_io import attention_changes, parse_settings
from dga_jax.errors import ConfigError, InputError
from dga_jax.model.config import ModelConfig
from dga_jax.ops.minference import MInferenceConfig
from dga_jax.ops.sinks import StreamingLLMConfig


def flat_params(model) -> dict[tuple[str, ...], jax.Array]:
    """Parameter path -> array."""
    return {path: v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_save_model_round_trips_params_and_config(converted, tmp_path):
    c = converted("tied")
    model = load_model(c.ckpt_dir, attention="dga")
    save_model(model, tmp_path / "again")
    assert load_config(tmp_path / "again") == model.config
    again = load_model(tmp_path / "again")
    assert again.config.attention == "dga"
    expected, restored = flat_params(model), flat_params(again)
    assert expected.keys() == restored.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(value), str(path))


def test_a_changed_param_dtype_casts_on_restore(converted):
    c = converted("gqa")
    model = load_model(c.ckpt_dir, param_dtype="bfloat16")
    q = model.layers.attn.q[...]
    assert q.dtype == jnp.bfloat16
    expected = load_model(c.ckpt_dir).layers.attn.q[...].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(expected, np.float32))


def test_loaded_arrays_sit_on_the_default_device(converted):
    model = load_model(converted("gqa").ckpt_dir)
    for path, value in flat_params(model).items():
        assert value.devices() == {jax.devices()[0]}, path


def test_the_abstract_model_of_7b_allocates_nothing():
    _, params, _ = abstract_model(ModelConfig.preset("llama2_7b"))
    leaves = jax.tree.leaves(params)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert sum(leaf.size for leaf in leaves) > 6.7e9
    assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in leaves)


def tiny_params(config: ModelConfig) -> dict[str, Any]:
    """Zero parameters of `Llama(config)`, as `nnx.to_pure_dict` nests them."""
    return traverse_util.unflatten_dict(
        {path: np.zeros(shape, np.float32) for path, shape in param_shapes(config).items()}
    )


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    config = ModelConfig.preset("tiny", num_layers=1)
    params = tiny_params(config)
    params["norm"]["weight"] = np.empty(params["norm"]["weight"].shape, object)  # Orbax fails
    with pytest.raises(ValueError, match="object"):
        save_params(tmp_path / "ckpt", config, params)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor Orbax's temporary one


# a change to a tiny's parameters -> what the error says after "the parameters to save: "
PARAM_CHANGES = {
    "drop lm_head": r"missing parameter\(s\) \['lm_head'\]",
    "add bias": r"parameter\(s\) \['layers.attn.bias'\] not in",
    "short q": r"parameter 'layers.attn.q' has shape \(1, 128, 4, 32\).*gives \(2, 128, 4, 32\)",
}


@pytest.mark.parametrize("change", sorted(PARAM_CHANGES))
def test_params_that_do_not_fit_the_config_are_not_saved(tmp_path, change):
    config = ModelConfig.preset("tiny")
    params = tiny_params(config)
    if change == "drop lm_head":
        del params["lm_head"]
    elif change == "add bias":
        params["layers"]["attn"]["bias"] = np.zeros(4, np.float32)
    else:
        params["layers"]["attn"]["q"] = params["layers"]["attn"]["q"][:1]
    with pytest.raises(CheckpointError, match="the parameters to save: " + PARAM_CHANGES[change]):
        save_params(tmp_path / "ckpt", config, params)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A saved one-layer tiny model and the JSON file of its stored config."""
    save_model(Llama(ModelConfig.preset("tiny", num_layers=1), rngs=nnx.Rngs(0)), tmp_path / "c")
    return tmp_path / "c", tmp_path / "c" / "model_config" / "metadata"


def test_a_config_saved_before_the_token_ids_loads(tiny_ckpt):
    ckpt, stored = tiny_ckpt
    old = json.loads(stored.read_text())
    for key in ("bos_token_id", "eos_token_ids", "pad_token_id"):
        del old[key]
    stored.write_text(json.dumps(old))
    config = load_config(ckpt)
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (None,) * 3
    assert config == ModelConfig.preset("tiny", num_layers=1)


def test_a_shape_changing_config_change_names_the_parameter(tiny_ckpt):
    ckpt, _ = tiny_ckpt
    params = re.escape(str(ckpt / "params"))
    expected = params + r": parameter 'layers.attn.k' has shape \(1, .*changed by \['num_layers'\]"
    with pytest.raises(CheckpointError, match=expected):
        load_model(ckpt, num_layers=2)
    with pytest.raises(CheckpointError, match=params + r".*\['lm_head'\] not in .*tie_embeddings"):
        load_model(ckpt, tie_embeddings=True)


def _truncate(path, size=10):
    with path.open("r+b") as f:
        f.truncate(size)


DAMAGES = {
    "array data truncated": lambda p: [_truncate(f) for f in p.glob("ocdbt.process_*/d/*")],
    "metadata truncated": lambda p: _truncate(p / "_METADATA"),
    "metadata emptied": lambda p: _truncate(p / "_METADATA", 0),
    "manifest removed": lambda p: (p / "manifest.ocdbt").unlink(),
    "manifest truncated": lambda p: _truncate(p / "manifest.ocdbt"),
    "btree truncated": lambda p: [_truncate(f) for f in p.glob("d/*")],
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_params_item_is_a_checkpoint_error_naming_it(tiny_ckpt, damage):
    # TensorStore's bare Exception (load_model) or ValueError (read_param), a JSONDecodeError
    # for damaged metadata: each was a traceback.
    ckpt, _ = tiny_ckpt
    DAMAGES[damage](ckpt / "params")
    cannot_read = rf"{re.escape(str(ckpt / 'params'))} cannot be read .* damaged or incomplete"
    with pytest.raises(CheckpointError, match=cannot_read):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match=cannot_read):
        read_param(ckpt, ("embed",))


def test_reading_an_absent_parameter_names_it(tiny_ckpt):
    ckpt, _ = tiny_ckpt
    with pytest.raises(CheckpointError, match=r"holds no parameter 'layers\.attn\.bias'"):
        read_param(ckpt, ("layers", "attn", "bias"))


@pytest.mark.parametrize("text", ['{"vocab_size": 512,', '{"num_kv_heads": 3}', "[]"])
def test_a_damaged_stored_config_is_an_input_error_naming_it(tiny_ckpt, text):
    ckpt, stored = tiny_ckpt
    stored.write_text(text)
    with pytest.raises(InputError, match=re.escape(str(ckpt / "model_config"))):
        load_config(ckpt)


def test_attention_changes_drop_a_dense_window_for_another_kind(tmp_path):
    # A converted Mistral 7B v0.1 (window 4096) evaluated under DGA: the window is dense
    # attention's, which DGA replaces (ModelConfig refuses the two together).
    windowed = ModelConfig.preset("tiny", attention="dense", sliding_window=8)
    save_model(Llama(windowed, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    changes = attention_changes(tmp_path / "ckpt", "dga")
    assert changes == {"attention": "dga", "attention_impl": None, "sliding_window": None}
    assert load_model(tmp_path / "ckpt", **changes).config.sliding_window is None
    assert attention_changes(tmp_path / "ckpt", "dense") == {}  # dense keeps its window


def test_attention_changes_switch_kind_and_settings_at_load_time(tmp_path):
    tiny = ModelConfig.preset("tiny", attention="dense", attention_impl="blockwise")
    save_model(Llama(tiny, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    changes = attention_changes(
        tmp_path / "ckpt", "streaming_llm", settings=parse_settings("recent_size=64", "--flag")
    )
    assert changes == {
        "attention": "streaming_llm",
        "attention_impl": None,
        "streaming_llm": StreamingLLMConfig(start_size=4, recent_size=64),
    }
    model = load_model(tmp_path / "ckpt", **changes)
    assert model.config.sinks == StreamingLLMConfig(4, 64)
    with pytest.raises(ConfigError, match="not of attention 'dense'"):
        attention_changes(tmp_path / "ckpt", settings={"recent_size": 64})
    with pytest.raises(ConfigError, match="unknown config key"):
        attention_changes(tmp_path / "ckpt", "lm_infinite", settings={"recent_size": 64})
    with pytest.raises(ValueError, match="lm_infinite.local_size must be an int >= 1"):
        attention_changes(tmp_path / "ckpt", "lm_infinite", settings={"local_size": 0})
    minference = attention_changes(tmp_path / "ckpt", "minference", settings={"slash_size": 500})
    model = load_model(tmp_path / "ckpt", **minference)
    assert model.config.minference == MInferenceConfig(vertical_size=1000, slash_size=500)
    with pytest.raises(ConfigError, match="--flag: give name=integer pairs"):
        parse_settings("recent_size=lots", "--flag")
