"""A run's inputs are checked before any work: every missing or unusable one is named in one
error, and `python -m train` ends on it with one `error: ...` line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import pytest
from flax import nnx

from configs import tiny_dga
from dga_jax import Llama, ModelConfig
from dga_jax.checkpoint import save_model
from dga_jax.errors import ConfigError, InputError
from dga_jax.sharding import make_mesh
from tests.data.conftest import record, train_hf_tokenizer, write_jsonl_zst
from train.config import TrainConfig, from_config_dict
from train.inputs import check_inputs, check_num_workers

ROOT = Path(__file__).parents[2]
CONVERT = "python -m dga_jax.checkpoint.convert hf-to-orbax"
INPUTS = ("init_checkpoint", "data.train", "data.validation", "data.tokenizer")


def launch(config: str, workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user's mistake ends the run with: exit code 2 and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


def test_the_7b_launch_without_its_inputs_names_each_flag(tmp_path):
    line = error_line(launch("configs/llama7b_dga.py", tmp_path / "w"))
    for key in INPUTS:
        assert f"--config.{key}=" in line, key
    assert CONVERT in line
    assert not (tmp_path / "w").exists()


def test_the_7b_launch_with_missing_files_names_each_path(tmp_path):
    paths = {key: tmp_path / "absent" / key for key in INPUTS}
    flags = [f"--config.{key}={path}" for key, path in paths.items()]
    line = error_line(launch("configs/llama7b_dga.py", tmp_path / "w", *flags))
    for key, path in paths.items():
        assert f"config.{key}: " in line and str(path) in line, key
    assert CONVERT in line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "flag, key",
    [
        ("--config.data.set_names=(1,2)", "config.data.set_names must be str"),
        ("--config.model.overrides.attention=sparse", "model.attention must be one of"),
        ("--config.optim.lerning_rate=1", "unknown config key 'lerning_rate'"),
        ("--config.train.steps=abc", "--config.train.steps=abc"),
        ("--config.data.num_workers=3", "config.data.num_workers=3 must divide the 8 rows"),
    ],
    ids=["type", "value", "unknown-key", "unparsable", "workers"],
)
def test_a_bad_config_value_ends_the_launch_naming_the_key(tmp_path, flag, key):
    line = error_line(launch("configs/tiny_dga.py", tmp_path / "w", flag))
    assert key in line
    assert not (tmp_path / "w").exists()


def test_a_missing_config_file_ends_the_launch_naming_it(tmp_path):
    line = error_line(launch("configs/tiny_dga_typo.py", tmp_path / "w"))
    assert line.startswith("error: --config:") and "configs/tiny_dga_typo.py" in line
    assert not (tmp_path / "w").exists()


def tiny(changes: dict[str, Any] | None = None) -> TrainConfig:
    """configs/tiny_dga.py with dotted keys changed: {"data.train": "...", ...}."""
    values = tiny_dga.get_config().to_dict()
    for dotted, value in (changes or {}).items():
        *path, name = dotted.split(".")
        section = values
        for key in path:
            section = section[key]
        section[name] = value
    return from_config_dict(values)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """`train/` and `validation/`, one small shard each."""
    root = tmp_path_factory.mktemp("shards")
    for split in ("train", "validation"):
        write_jsonl_zst(root / split / f"{split}_0.jsonl.zst", [record("a few words")] * 4)
    return root


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset (2 layers in configs/tiny_dga.py) with 1 layer."""
    path = tmp_path_factory.mktemp("ckpt") / "one_layer"
    with jax.set_mesh(make_mesh((1, 1, 1, 1))):
        model = Llama(ModelConfig.preset("tiny", num_layers=1), rngs=nnx.Rngs(0))
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def tokenizer_300(tmp_path_factory) -> Path:
    """A tokenizer.json of 300 ids."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    return train_hf_tokenizer(path, ["<unk>", "<s>", "</s>"])


def test_the_embedded_default_passes():
    check_inputs(tiny())


def test_a_run_with_every_input_set_passes(one_layer_checkpoint, shards, tokenizer_300):
    config = {
        "model.overrides.num_layers": 1,
        "init_checkpoint": str(one_layer_checkpoint),
        "data.train": str(shards / "train"),
        "data.validation": str(shards / "validation"),
        "data.tokenizer": str(tokenizer_300),
    }
    check_inputs(tiny(config))


def test_a_checkpoint_of_another_architecture_is_named(one_layer_checkpoint):
    with pytest.raises(InputError, match="another architecture") as error:
        check_inputs(tiny({"init_checkpoint": str(one_layer_checkpoint)}))
    assert str(one_layer_checkpoint) in str(error.value)
    assert "num_layers=1 (config: 2; --config.model.overrides.num_layers=1)" in str(error.value)
    assert "d_model" not in str(error.value)  # only the fields that differ


def test_a_checkpoint_trained_with_another_rope_base_is_said(one_layer_checkpoint, caplog):
    # Same shapes, other numerics: the run trains with the config's, and says so.
    changes = {"init_checkpoint": str(one_layer_checkpoint), "model.overrides.num_layers": 1}
    with caplog.at_level("WARNING"):
        check_inputs(tiny({**changes, "model.overrides.rope_theta": 500.0}))
    assert "trained with rope_theta=10000.0; the run trains with config.model's 500.0" in (
        caplog.text
    )
    assert "overrides.rope_theta=10000.0 keeps the checkpoint's" in caplog.text
    assert "norm_eps" not in caplog.text  # only the fields that differ


def test_a_checkpoint_trained_with_partial_rope_is_said(one_layer_checkpoint, caplog):
    # RoPE on part of each head (a converted Phi-4-mini) changes what the weights compute.
    changes = {"init_checkpoint": str(one_layer_checkpoint), "model.overrides.num_layers": 1}
    with caplog.at_level("WARNING"):
        check_inputs(tiny({**changes, "model.overrides.rotary_dim": 8}))
    assert "trained with rotary_dim=None; the run trains with config.model's 8" in caplog.text


def test_a_checkpoint_trained_with_another_rope_scaling_is_said(one_layer_checkpoint, caplog):
    # A converted YaRN checkpoint under a config without it: said, with the flags that keep it.
    changes = {"init_checkpoint": str(one_layer_checkpoint), "model.overrides.num_layers": 1}
    yarn = {"kind": "yarn", "factor": 4.0, "original_max_position": 1024}
    with caplog.at_level("WARNING"):
        check_inputs(tiny({**changes, "model.overrides.rope_scaling": yarn}))
    assert "trained with rope_scaling=RopeScaling(kind='none'" in caplog.text
    flags = "--config.model.overrides.rope_scaling.kind=none --config.model.overrides."
    assert flags + "rope_scaling.factor=1.0 " in caplog.text
    assert "rope_scaling.original_max_position=8192 keeps the checkpoint's" in caplog.text


def test_a_checkpoint_trained_with_another_sliding_window_is_said(
    one_layer_checkpoint, tmp_path, caplog
):
    # Dense attention's window changes what the weights compute: said, as rope_theta is.
    changes = {"model.overrides.num_layers": 1, "model.overrides.attention": "dense"}
    with caplog.at_level("WARNING"):
        check_inputs(tiny({**changes, "init_checkpoint": str(one_layer_checkpoint),
                           "model.overrides.sliding_window": 64}))  # fmt: skip
    assert "trained with sliding_window=None; the run trains with config.model's 64" in (
        caplog.text
    )
    assert "(no --config.model.overrides.sliding_window flag keeps the checkpoint's)" in (
        caplog.text
    )
    # DGA replaces dense attention, window and all: nothing to say of a windowed checkpoint.
    with jax.set_mesh(make_mesh((1, 1, 1, 1))):
        windowed = ModelConfig.preset("tiny", num_layers=1, sliding_window=64)
        save_model(Llama(windowed, rngs=nnx.Rngs(0)), tmp_path / "windowed")
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_inputs(tiny({"model.overrides.num_layers": 1,
                           "init_checkpoint": str(tmp_path / "windowed")}))  # fmt: skip
    assert "sliding_window" not in caplog.text


def test_a_directory_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(InputError, match="not a model checkpoint") as error:
        check_inputs(tiny({"init_checkpoint": str(tmp_path / "weights")}))
    assert "config.init_checkpoint" in str(error.value) and CONVERT in str(error.value)


def test_a_tokenizer_larger_than_the_vocabulary_is_named(tokenizer_300):
    config = tiny({"data.tokenizer": str(tokenizer_300), "model.overrides.vocab_size": 260})
    with pytest.raises(InputError, match=r"has 300 ids, more than the model's vocab_size=260"):
        check_inputs(config)


def test_training_shards_without_validation_shards_are_named(shards):
    with pytest.raises(InputError, match=r"config\.data\.validation is not set"):
        check_inputs(tiny({"data.train": str(shards / "train")}))


def test_validation_shards_without_training_shards_are_named(shards):
    with pytest.raises(InputError, match=r"config\.data\.train is not set"):
        check_inputs(tiny({"data.validation": str(shards / "validation")}))


def test_a_tokenizer_without_the_tokens_to_add_is_named(tmp_path):
    gpt2_like = train_hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>"])  # EOS only
    with pytest.raises(InputError) as error:
        check_inputs(tiny({"data.tokenizer": str(gpt2_like)}))
    assert "has no BOS token to add: set --config.data.add_bos=False" in str(error.value)
    assert "EOS" not in str(error.value)
    check_inputs(tiny({"data.tokenizer": str(gpt2_like), "data.add_bos": False}))


@pytest.mark.parametrize("workers, rows", [(0, 3), (1, 3), (2, 4), (4, 4)])
def test_workers_that_divide_the_rows_pass(workers, rows):
    check_num_workers(tiny({"data.num_workers": workers}), rows)


def test_workers_that_do_not_divide_the_rows_are_named():
    with pytest.raises(ConfigError, match=r"config\.data\.num_workers=3 must divide the 8 rows"):
        check_num_workers(tiny({"data.num_workers": 3}), 8)


def test_a_directory_without_shards_is_named(shards, tmp_path):
    config = tiny({"data.train": str(shards / "train"), "data.validation": str(tmp_path)})
    with pytest.raises(InputError, match=r"config\.data\.validation: no .* shards found"):
        check_inputs(config)


def test_a_split_without_a_usable_document_is_named(shards, tmp_path):
    # It passed, and the run failed at its first evaluation, the steps before it unsaved.
    write_jsonl_zst(tmp_path / "validation.jsonl.zst", [b"{not json"])
    config = tiny({"data.train": str(shards / "train"), "data.validation": str(tmp_path)})
    message = (
        r"config\.data\.validation: the 'validation' split has no usable document \(its 1 "
        r"records an epoch are 1 malformed\)"
    )
    with pytest.raises(InputError, match=message):
        check_inputs(config)


def test_every_problem_is_named_in_one_error(one_layer_checkpoint, tokenizer_300, tmp_path):
    config = {
        "init_checkpoint": str(one_layer_checkpoint),
        "data.train": str(tmp_path / "train"),
        "data.validation": str(tmp_path / "validation"),
        "data.tokenizer": str(tokenizer_300),
        "model.overrides.vocab_size": 260,
    }
    with pytest.raises(InputError) as error:
        check_inputs(tiny(config))
    message = str(error.value)
    assert "vocab_size=512 (config: 260; --config.model.overrides.vocab_size=512), " in message
    assert "num_layers=1 (config: 2; --config.model.overrides.num_layers=1)" in message
    assert f"config.data.train: no .jsonl.zst/.jsonl/.parquet shards found at '{tmp_path}" in (
        message
    )
    assert "config.data.validation: no" in message and "has 300 ids" in message


def test_a_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(InputError, match=r"config\.data\.tokenizer: .*does not exist"):
        check_inputs(tiny({"data.tokenizer": str(tmp_path / "tokenizer.model")}))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_processes=2", "--process_id=0"], "--num_processes, --process_id set without"),
        (["--distributed", "--coordinator_address=host0"], "=host0 must be host:port"),
        (["--distributed", "--num_processes=0"], "--num_processes=0 must be >= 1"),
        (["--distributed", "--process_id=-1"], "--process_id=-1 must be >= 0"),
        (["--distributed", "--num_processes=2", "--process_id=2"], "must be < --num_processes=2"),
    ],
    ids=["without-distributed", "no-port", "no-processes", "negative-id", "id-past-count"],
)
def test_bad_peer_flags_end_the_launch_naming_them(tmp_path, flags, message):
    # Without --distributed the peer flags were ignored: each host trained alone.
    line = error_line(launch("configs/tiny_dga.py", tmp_path / "w", *flags))
    assert message in line
    assert not (tmp_path / "w").exists()
