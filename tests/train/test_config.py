"""Every experiment config loads; bad keys, types and unset inputs fail early, naming the key."""

from __future__ import annotations

import importlib
import logging
import math
import pathlib
import re

import pytest

from train.config import INPUTS, ConfigError, MeshConfig, from_config_dict
from train.resume import flat_record, resume_changes

CONFIG_DIR = pathlib.Path(__file__).parents[2] / "configs"
EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "base"))


def load(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


def unset_inputs(config) -> list[str]:
    """The required inputs (`INPUTS`) `config` leaves for the command line."""
    return [key for key in INPUTS if section(config, key)[key.split(".")[-1]] is None]


def section(config, dotted: str):
    for key in dotted.split(".")[:-1]:
        config = config[key]
    return config


def with_inputs(config):
    """`config` with every required input it leaves unset given a dummy path."""
    for key in unset_inputs(config):
        section(config, key)[key.split(".")[-1]] = f"/inputs/{key}"
    return config


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_converts(name):
    config = from_config_dict(with_inputs(load(name)))
    assert config.train.steps > 0
    assert (config.model.attention == "dga") == name.endswith("_dga")
    assert load(name).to_dict() == load(name).to_dict()  # get_config is deterministic


def test_every_config_documents_its_launch_command():
    for name in EXPERIMENTS:
        doc = importlib.import_module(f"configs.{name}").__doc__
        assert f"--config=configs/{name}.py" in doc, name


def test_every_config_documents_its_required_inputs():
    for name in EXPERIMENTS:
        doc = importlib.import_module(f"configs.{name}").__doc__
        documented = set(re.findall(r"--config\.([\w.]+)=", doc))
        missing = [key for key in unset_inputs(load(name)) if key not in documented]
        assert not missing, f"configs/{name}.py's launch command leaves {missing} unset"


def test_a_config_that_tells_to_set_train_data_tells_to_set_validation_data():
    """`train.inputs` refuses data.train without data.validation ("set both or neither"): a
    docstring naming one names the other, or its advice ends in that error."""
    for name in EXPERIMENTS:
        doc = importlib.import_module(f"configs.{name}").__doc__
        named = set(re.findall(r"--config\.(data\.(?:train|validation))\b", doc))
        assert named in (set(), {"data.train", "data.validation"}), (name, named)


@pytest.mark.parametrize("name", ["llama7b_dga", "llama7b_dense"])
def test_a_7b_config_without_its_inputs_names_each_one(name):
    assert unset_inputs(load(name)) == list(INPUTS)
    with pytest.raises(ConfigError, match="^required input") as error:
        from_config_dict(load(name))
    for key in INPUTS:
        assert f"--config.{key}=" in str(error.value), key
    assert "python -m dga_jax.checkpoint.convert hf-to-orbax" in str(error.value)


def test_only_the_inputs_left_unset_are_named():
    config = with_inputs(load("llama7b_dga"))
    config.data.tokenizer = None
    with pytest.raises(ConfigError) as error:
        from_config_dict(config)
    assert str(error.value).startswith("required input(s) not set: --config.data.tokenizer=FILE")
    assert "--config.data.train" not in str(error.value)


def test_a_7b_config_with_its_inputs_converts():
    config = from_config_dict(with_inputs(load("llama7b_dga")))
    assert config.init_checkpoint == "/inputs/init_checkpoint"
    assert (config.data.train, config.data.validation, config.data.tokenizer) == (
        "/inputs/data.train",
        "/inputs/data.validation",
        "/inputs/data.tokenizer",
    )


def test_llama7b_follows_the_paper_recipe():
    config = from_config_dict(with_inputs(load("llama7b_dga")))
    assert (config.data.seq_len, config.train.global_batch_size, config.train.steps) == (
        8192,
        64,
        1000,
    )
    assert (config.optim.learning_rate, config.optim.warmup_steps, config.optim.schedule) == (
        2e-5,
        20,
        "constant",
    )
    assert config.optim.weight_decay == 0.0
    assert config.model.rope_scaling.kind == "linear" and config.model.rope_scaling.factor == 2.0
    assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")
    assert (config.model.dga.group_size, config.model.dga.focal_ratio) == (16, 0.1)
    assert config.model.d_model == 4096 and config.model.num_layers == 32


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("optim", "lerning_rate"), 1.0, r"config\.optim\.lerning_rate"),
        (("optimiser",), {}, r"config\.optimiser"),
        (("model", "overrides", "d_modle"), 8, r"d_modle"),
        (("model", "overrides", "attention"), "sparse", r"attention"),
        (("model", "preset"), "llama9", r"llama9"),
        (("mesh", "context_parallel"), "ring", r"config\.mesh\.context_parallel must be one of"),
        (("mesh", "context_order"), "random", r"config\.mesh\.context_order must be one of"),
        (("model", "overrides", "context_parallel"), "dga", r"set config\.mesh\.context_paral"),
        (("data", "seq_len"), 0, r"config\.data\.seq_len must be >= 1, got 0"),
        (("data", "num_workers"), -1, r"config\.data\.num_workers must be >= 0"),
        (("model", "overrides", "attention"), "minference", r"'minference' has no gradient"),
        (("data", "seq_len"), 32769, r"seq_len=32769 is past the model's max_position=32768"),
    ],
    ids=[
        "optim-key",
        "section",
        "model-key",
        "model-value",
        "preset",
        "cp",
        "order",
        "cp-model",
        "seq-len",
        "workers",
        "untrainable",
        "past-max-position",
    ],
)
def test_bad_keys_are_named(path, value, match):
    config = load("tiny_dga").to_dict()
    section = config
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    with pytest.raises(ConfigError, match=match):
        from_config_dict(config)


def test_streaming_kinds_train_past_max_position():
    # Their windows cap every RoPE distance (generation streams on past max_position too).
    config = load("tiny_dga").to_dict()
    config["data"]["seq_len"] = 32769
    config["model"]["overrides"]["attention"] = "lm_infinite"
    assert from_config_dict(config).data.seq_len == 32769


def test_wrong_types_are_named():
    config = load("tiny_dga").to_dict()
    config["train"]["steps"] = "100"
    with pytest.raises(ConfigError, match=r"config\.train\.steps must be int"):
        from_config_dict(config)
    config = load("tiny_dga").to_dict()
    config["optim"]["learning_rate"] = True
    with pytest.raises(ConfigError, match=r"config\.optim\.learning_rate must be float"):
        from_config_dict(config)
    config = load("tiny_dga").to_dict()
    config["optim"]["learning_rate"] = 1  # an int where a float goes is fine
    assert from_config_dict(config).optim.learning_rate == 1.0


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("grad_clip_norm", 0.0, "> 0"),
        ("learning_rate", -1e-3, "> 0"),
        ("warmup_steps", -5, ">= 0"),
        ("weight_decay", -0.1, ">= 0"),
        ("end_learning_rate_factor", -0.1, "in [0, 1]"),
        ("b2", 1.0, "in [0, 1)"),
        ("eps", 0.0, "> 0"),
        # An infinite value passed: every weight inf after one step, or (eps) every step zero.
        ("learning_rate", math.inf, "> 0 and finite"),
        ("weight_decay", math.inf, ">= 0 and finite"),
        ("eps", math.inf, "> 0 and finite"),
        # A cosine "decay" to 10 x the peak learning rate (0.1 mistyped as 10) passed.
        ("end_learning_rate_factor", 10.0, "in [0, 1]"),
    ],
)
def test_optimizer_values_that_would_train_wrongly_are_named(key, value, rule):
    config = load("tiny_dga").to_dict()
    config["optim"][key] = value
    with pytest.raises(ConfigError, match=rf"^config\.optim\.{key} must be {re.escape(rule)}"):
        from_config_dict(config)


def test_an_infinite_clipping_norm_turns_clipping_off():
    config = load("tiny_dga").to_dict()
    config["optim"]["grad_clip_norm"] = math.inf
    config["optim"]["end_learning_rate_factor"] = 1.0
    assert from_config_dict(config).optim.grad_clip_norm == math.inf


@pytest.mark.parametrize(
    "key, value, match",
    [
        # Past int64 the run ended in JAX's OverflowError traceback when the model was built.
        ("seed", 2**63, r"config\.train\.seed must fit in int64, got 9223372036854775808"),
        ("peak_flops_per_device", -1.0, r"config\.train\.peak_flops_per_device must be >= 0"),
        ("peak_flops_per_device", math.nan, r"config\.train\.peak_flops_per_device must be >= 0"),
    ],
)
def test_run_values_out_of_range_are_named(key, value, match):
    config = load("tiny_dga").to_dict()
    config["train"][key] = value
    with pytest.raises(ConfigError, match=match):
        from_config_dict(config)
    config["train"][key] = {"seed": -(2**63), "peak_flops_per_device": 0.0}[key]
    assert getattr(from_config_dict(config).train, key) == config["train"][key]


@pytest.mark.parametrize("value", ["10", "3,2", "0,1", "5,a", "1,2,3", "190,201"])
def test_profile_steps_outside_the_run_are_named(value):
    config = load("tiny_dga").to_dict()
    config["train"]["profile_steps"] = value
    with pytest.raises(ConfigError, match=r"config\.train\.profile_steps must be 'first,last'"):
        from_config_dict(config)
    config["train"]["profile_steps"] = "199,200"
    assert from_config_dict(config).train.profile_range == (199, 200)


def test_bos_and_eos_can_be_left_out():
    config = load("tiny_dga").to_dict()
    data = from_config_dict(config).data
    assert (data.add_bos, data.add_eos) == (True, True)
    config["data"].update(add_bos=False, add_eos=False)
    data = from_config_dict(config).data
    assert (data.add_bos, data.add_eos) == (False, False)


def test_a_resume_may_not_change_bos_or_eos():
    stored = flat_record(from_config_dict(load("tiny_dga")))
    config = load("tiny_dga").to_dict()
    config["data"]["add_bos"] = False
    with pytest.raises(ConfigError, match=r"config\.data\.add_bos: True -> False"):
        resume_changes(stored, from_config_dict(config), "the checkpoint")


def test_a_checkpoint_from_before_bos_and_eos_were_keys_resumes():
    # Such runs added both; their records lack the keys.
    config = from_config_dict(load("tiny_dga"))
    stored = flat_record(config)
    del stored["data.add_bos"], stored["data.add_eos"]
    assert resume_changes(stored, config, "the checkpoint") == []


def test_a_checkpoint_from_before_loss_chunks_resumes_unchanged():
    # Such runs took the loss over whole rows: loss_chunks 1, no change to report.
    config = from_config_dict(load("tiny_dga"))
    stored = flat_record(config)
    del stored["train.loss_chunks"]
    assert resume_changes(stored, config, "the checkpoint") == []


def test_a_checkpoint_from_before_attention_biases_and_yarn_resumes_unchanged():
    # Such runs had no biases and no YaRN settings: the defaults, no change to report.
    config = from_config_dict(load("tiny_dga"))
    stored = flat_record(config)
    for key in ("qkv_bias", "o_bias", "beta_fast", "beta_slow", "truncate"):
        del stored[f"model.{key}" if "bias" in key else f"model.rope_scaling.{key}"]
    assert resume_changes(stored, config, "the checkpoint") == []


def test_batch_must_split_into_micro_batches():
    config = load("tiny_dga").to_dict()
    config["train"]["grad_accum_steps"] = 3
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        from_config_dict(config)


@pytest.mark.parametrize(
    "mesh, devices, shape",
    [
        (MeshConfig(), 8, (1, 8, 1, 1)),
        (MeshConfig(data=2, fsdp=2, seq=2, tensor=1), 8, (2, 2, 2, 1)),
        (MeshConfig(data=1, fsdp=2, seq=-1, tensor=2), 8, (1, 2, 2, 2)),
    ],
)
def test_mesh_shapes(mesh, devices, shape):
    assert mesh.shape(devices) == shape


def test_context_parallelism_reaches_the_model():
    config = load("tiny_dga")
    config.mesh.update(seq=4, context_parallel="dga", context_order="zigzag")
    model = from_config_dict(config).model
    assert (model.context_parallel, model.context_order) == ("dga", "zigzag")
    assert from_config_dict(load("tiny_dga")).model.context_parallel == "auto"


def test_bad_meshes_are_rejected():
    with pytest.raises(ConfigError, match="does not divide"):
        MeshConfig(data=3).shape(8)
    with pytest.raises(ConfigError, match="needs 16 devices"):
        MeshConfig(data=2, fsdp=8).shape(8)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_model_field_can_be_set_on_the_command_line(name):
    # `--config.model.overrides.X=...` sets an existing key of a locked config: every
    # ModelConfig field must be there (unset: the preset's value), nested ones too.
    config = load(name)
    config.lock()
    preset = from_config_dict(with_inputs(load(name))).model
    config.model.overrides.num_layers = preset.num_layers + 1
    config.model.overrides.rope_theta = 500000
    config.model.overrides.dga.focal_ratio = 0.25
    config.model.overrides.rope_scaling.original_max_position = 4096
    model = from_config_dict(with_inputs(config)).model
    assert model.num_layers == preset.num_layers + 1 and model.rope_theta == 500000.0
    assert model.dga.focal_ratio == 0.25 and model.rope_scaling.original_max_position == 4096
    assert model.d_model == preset.d_model and model.dga.group_size == preset.dga.group_size
    assert model.rope_scaling.kind == preset.rope_scaling.kind


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog):
    # Accepted silently: the run never reached its learning rate, nor decayed.
    config = load("tiny_dga")
    config.train.steps, config.optim.warmup_steps = 10, 10
    with caplog.at_level(logging.WARNING):
        from_config_dict(config)
    assert "config.optim.warmup_steps=10 >= config.train.steps=10" in caplog.text
    caplog.clear()
    config.optim.warmup_steps = 9
    with caplog.at_level(logging.WARNING):
        from_config_dict(config)
    assert "warmup_steps" not in caplog.text
