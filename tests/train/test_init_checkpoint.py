"""`config.init_checkpoint`: training starts from a converted checkpoint's weights."""

from __future__ import annotations

import logging

import jax
import numpy as np
from flax import nnx

from configs import tiny_dga
from dga_jax import Llama
from dga_jax.checkpoint import save_model
from train import loop
from train.config import from_config_dict
from train.setup import make_setup, new_model


def test_training_starts_from_the_checkpoint_weights(tmp_path):
    config = tiny_dga.get_config()
    config.data.seq_len = 64
    dense = from_config_dict(config).model.replace(attention="dense")
    pretrained = Llama(dense, rngs=nnx.Rngs(123))  # a "converted" dense checkpoint
    save_model(pretrained, tmp_path / "ckpt")

    config.init_checkpoint = str(tmp_path / "ckpt")
    train_config = from_config_dict(config)
    setup = make_setup(train_config)
    with jax.set_mesh(setup.mesh):
        params = loop._initial_params(train_config, setup)
        fresh = nnx.state(new_model(train_config), nnx.Param)
    expected = nnx.to_pure_dict(nnx.state(pretrained, nnx.Param))
    loaded = nnx.to_pure_dict(params)
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The experiment's architecture (DGA attention) is applied on top of the weights.
    model = nnx.merge(setup.graphdef, params)
    assert model.config.attention == "dga"
    first = jax.tree.leaves(nnx.to_pure_dict(fresh))[0]
    assert not np.array_equal(np.asarray(first), np.asarray(jax.tree.leaves(loaded)[0]))


def test_the_exported_model_keeps_the_checkpoint_token_ids(tmp_path):
    # The presets set no bos / eos / pad: a run from a converted LLaMA2-7B exported none.
    config = tiny_dga.get_config()
    stored = from_config_dict(config).model.replace(bos_token_id=1, eos_token_ids=(2,))
    save_model(Llama(stored, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    config.init_checkpoint = str(tmp_path / "ckpt")
    exported = loop._exported_config(from_config_dict(config))
    assert (exported.bos_token_id, exported.eos_token_ids, exported.pad_token_id) == (1, (2,), None)
    config.model.overrides.eos_token_ids = (7, 8)  # the run's own ids win
    exported = loop._exported_config(from_config_dict(config))
    assert (exported.bos_token_id, exported.eos_token_ids) == (1, (7, 8))


def test_a_run_from_a_phi3_exports_its_layout_where_phi3_can_hold_it(tmp_path, caplog):
    """Phi-3's fused tensors (`hf_model_type`) carry over to the exported model; a RoPE kind
    Phi-3 has not (linear) leaves the LLaMA layout, logged, rather than an export that fails."""
    config = tiny_dga.get_config()
    stored = from_config_dict(config).model.replace(hf_model_type="phi3")
    save_model(Llama(stored, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    config.init_checkpoint = str(tmp_path / "ckpt")
    assert loop._exported_config(from_config_dict(config)).hf_model_type == "phi3"
    config.model.overrides.rope_scaling = {"kind": "linear", "factor": 2.0}
    with caplog.at_level(logging.WARNING):
        exported = loop._exported_config(from_config_dict(config))
    assert exported.hf_model_type is None
    assert "keeps no phi3 layout" in caplog.text and "linear" in caplog.text


def test_a_run_takes_the_configs_window_and_rope_over_the_checkpoints(tmp_path):
    """A DGA run from a windowed dense checkpoint (Mistral v0.1, Phi-3-mini-4k): the run's own
    fields that shape no weight (`NUMERIC_FIELDS`) replace the checkpoint's; the window kept
    would be refused under DGA, after the input checks had passed."""
    config = tiny_dga.get_config()
    windowed = from_config_dict(config).model.replace(attention="dense", sliding_window=32)
    save_model(Llama(windowed, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    config.init_checkpoint = str(tmp_path / "ckpt")
    config.model.overrides.rotary_dim = 16
    train_config = from_config_dict(config)
    setup = make_setup(train_config)
    with jax.set_mesh(setup.mesh):
        params = loop._initial_params(train_config, setup)
    model = nnx.merge(setup.graphdef, params)
    assert (model.config.attention, model.config.sliding_window) == ("dga", None)
    assert model.config.rotary_dim == 16
