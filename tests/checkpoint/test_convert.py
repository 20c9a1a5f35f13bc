"""The conversion commands: the CLI, dtypes, sharding of the output, and clear errors."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from dga_jax import Llama
from dga_jax.checkpoint import (
    CheckpointError,
    convert,
    load_config,
    load_model,
    read_param,
    save_model,
)
from dga_jax.checkpoint.convert import _run_command
from dga_jax.checkpoint.hf import INDEX_FILE, tensor_files
from dga_jax.checkpoint.hf_weights import param_shapes, weights
from dga_jax.checkpoint.hf_write import parse_size, write_hf
from dga_jax.model.config import ModelConfig
from tests.checkpoint.conftest import (
    assert_same_params,
    build_hf_model,
    save_sharded,
    to_hf,
    to_orbax,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def q_of(model: LlamaForCausalLM, layer: int) -> np.ndarray:
    """HF's q_proj of a layer as ours: [d, H, hd], float32."""
    weight = model.model.layers[layer].self_attn.q_proj.weight.detach().float().numpy()
    return weight.T.reshape(64, 4, 16)


def test_the_command_runs_as_a_module(converted, tmp_path):
    c = converted("gqa")
    out = tmp_path / "orbax"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dga_jax.checkpoint.convert",
            "hf-to-orbax",
            "--hf_dir",
            str(c.hf_dir),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
    )
    assert_same_params(out, c.ckpt_dir)


def test_a_single_file_checkpoint_reads_like_a_sharded_one(converted, tmp_path):
    c = converted("gqa")
    c.model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert not (tmp_path / "hf" / INDEX_FILE).exists()
    to_orbax(tmp_path / "hf", tmp_path / "orbax")
    assert_same_params(tmp_path / "orbax", c.ckpt_dir)


def test_bfloat16_is_kept_by_default_and_cast_on_request(tmp_path):
    model = build_hf_model(num_key_value_heads=2).to(torch.bfloat16)
    hf_dir = save_sharded(model, tmp_path / "hf")
    to_orbax(hf_dir, tmp_path / "bf16")
    to_orbax(hf_dir, tmp_path / "f32", "--dtype", "float32")
    assert load_config(tmp_path / "bf16").param_dtype == "bfloat16"
    assert load_config(tmp_path / "f32").param_dtype == "float32"
    q_bf16 = read_param(tmp_path / "bf16", ("layers", "attn", "q"))
    q_f32 = read_param(tmp_path / "f32", ("layers", "attn", "q"))
    assert (q_bf16.dtype, q_f32.dtype) == (jnp.bfloat16, np.float32)
    np.testing.assert_array_equal(q_f32[1], q_of(model, 1))
    np.testing.assert_array_equal(q_bf16.astype(np.float32), q_f32)


def test_export_casts_to_the_requested_dtype(converted, tmp_path):
    c = converted("mha")
    to_hf(c.ckpt_dir, tmp_path / "hf", "--dtype", "bfloat16")
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.config.dtype == torch.bfloat16
    rounded = c.model.model.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16)
    assert torch.equal(exported.model.layers[0].self_attn.q_proj.weight, rounded)


@pytest.mark.parametrize("eos", [7, [6, 7]])
def test_special_token_ids_survive_a_round_trip(tmp_path, eos):
    model = build_hf_model(num_key_value_heads=2, bos_token_id=5, eos_token_id=eos, pad_token_id=0)
    to_orbax(save_sharded(model, tmp_path / "hf"), tmp_path / "orbax")
    config = load_config(tmp_path / "orbax")
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (
        5,
        tuple(eos) if isinstance(eos, list) else (eos,),
        0,
    )
    to_hf(tmp_path / "orbax", tmp_path / "exported")
    for exported in (
        LlamaConfig.from_pretrained(tmp_path / "exported"),
        GenerationConfig.from_pretrained(tmp_path / "exported"),
    ):
        assert (exported.bos_token_id, exported.eos_token_id, exported.pad_token_id) == (5, eos, 0)


def test_export_shards_respect_the_size_limit(converted, tmp_path):
    c = converted("untied")
    to_hf(c.ckpt_dir, tmp_path / "hf", "--max_shard_size", "20KB")
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    weight_map, total = index["weight_map"], 0
    assert set(weight_map) == {n for w in weights(load_config(c.ckpt_dir)) for n in w.names(2)}
    for file in sorted(set(weight_map.values())):
        tensors = load_file(tmp_path / "hf" / file)
        assert set(tensors) == {name for name, f in weight_map.items() if f == file}
        size = sum(t.nbytes for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize(
    "size, expected",
    [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("40KB", 40_000), ("1.5MB", 1_500_000), (123, 123)],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("5 gigs")


@pytest.mark.parametrize("tied", [False, True])
def test_the_name_table_covers_every_model_parameter(tied):
    config = ModelConfig.preset("tiny", tie_embeddings=tied)
    assert {w.path for w in weights(config)} == set(param_shapes(config))


# Errors ------------------------------------------------------------------------------------


@pytest.fixture
def hf_copy(tmp_path):
    """A fresh sharded HF checkpoint that a test may damage."""
    return save_sharded(build_hf_model(num_key_value_heads=2), tmp_path / "hf")


def rewrite_shard(hf_dir: pathlib.Path, name: str, replacement: np.ndarray | None) -> str:
    """Rewrites the shard holding `name` without it (None) or with another array; its path."""
    files, _ = tensor_files(hf_dir)
    tensors = load_file(files[name])
    if replacement is None:
        del tensors[name]
    else:
        tensors[name] = replacement
    save_file(tensors, files[name], metadata={"format": "pt"})
    return files[name]


def test_a_tensor_missing_from_its_shard_is_named_with_the_file(hf_copy, tmp_path):
    shard = rewrite_shard(hf_copy, Q_PROJ, None)
    out = tmp_path / "orbax"
    with pytest.raises(CheckpointError, match=re.escape(f"'{Q_PROJ}' is missing from {shard}")):
        to_orbax(hf_copy, out)
    assert not out.exists()


def test_a_tensor_missing_from_the_index_is_named_with_the_index(hf_copy, tmp_path):
    index = hf_copy / INDEX_FILE
    content = json.loads(index.read_text())
    del content["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(content))
    expected = re.escape(f"'model.norm.weight' is missing from {index}")
    with pytest.raises(CheckpointError, match=expected):
        to_orbax(hf_copy, tmp_path / "orbax")


def test_a_wrong_shape_names_the_tensor_and_both_shapes(hf_copy, tmp_path):
    rewrite_shard(hf_copy, Q_PROJ, np.zeros((32, 64), np.float32))
    expected = re.escape(f"'{Q_PROJ}'") + r".*\(32, 64\).*\(64, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        to_orbax(hf_copy, tmp_path / "orbax")
    assert not (tmp_path / "orbax").exists()


def test_an_unexpected_tensor_is_rejected(hf_copy, tmp_path):
    index = hf_copy / INDEX_FILE
    content = json.loads(index.read_text())
    bias = "model.layers.0.self_attn.q_proj.bias"
    content["weight_map"][bias] = content["weight_map"][Q_PROJ]
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*q_proj\.bias"):
        to_orbax(hf_copy, tmp_path / "orbax")


def test_a_non_float_tensor_is_rejected(hf_copy, tmp_path):
    shard = rewrite_shard(hf_copy, Q_PROJ, np.full((64, 64), 7, np.int8))
    expected = re.escape(f"'{Q_PROJ}' in {shard} is stored as I8")
    with pytest.raises(CheckpointError, match=expected):
        to_orbax(hf_copy, tmp_path / "orbax")
    assert not (tmp_path / "orbax").exists()


def test_an_unsupported_architecture_is_rejected(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config.update(architectures=["GemmaForCausalLM"], model_type="gemma")
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*GemmaForCausalLM"):
        to_orbax(hf_copy, tmp_path / "orbax")


def test_missing_files_are_named(hf_copy, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "config.json"))):
        to_orbax(missing, tmp_path / "orbax")
    (hf_copy / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(hf_copy / INDEX_FILE))):
        to_orbax(hf_copy, tmp_path / "orbax")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        to_hf(missing, tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model(missing)


def test_an_existing_output_is_not_overwritten(converted, tmp_path, monkeypatch):
    c = converted("gqa")
    read = []

    def read_hf(*args):
        read.append(args)
        raise AssertionError("read the weights before checking --out")

    monkeypatch.setattr(convert, "read_hf", read_hf)
    with pytest.raises(FileExistsError, match=re.escape(str(c.ckpt_dir))):
        to_orbax(c.hf_dir, c.ckpt_dir)
    assert read == []  # refused before a 7B model's weights are read
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match=re.escape(str(c.hf_dir))):
        to_hf(c.ckpt_dir, c.hf_dir)


def test_a_failed_export_leaves_nothing_behind(converted, tmp_path):
    c = converted("gqa")
    config = load_config(c.ckpt_dir)
    calls = []

    def read_then_fail(path: tuple[str, ...]) -> np.ndarray:
        calls.append(path)
        if len(calls) > 3:
            raise OSError("disk on fire")
        return read_param(c.ckpt_dir, path)

    with pytest.raises(OSError, match="disk on fire"):
        write_hf(tmp_path / "hf", config, read_then_fail, dtype="float32", max_shard_size=1000)
    assert list(tmp_path.iterdir()) == []


def test_every_exported_file_is_on_disk_before_the_rename(converted, tmp_path, monkeypatch):
    synced, renamed = [], []
    fsync, rename = os.fsync, os.rename

    def record_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def record_rename(src, dst) -> None:
        renamed.append((len(synced), str(src)))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record_rename)
    to_hf(converted("gqa").ckpt_dir, tmp_path / "hf", "--max_shard_size", "40KB")
    [(before, tmp)] = renamed
    files = [str(tmp_path / "hf" / name) for name in sorted(os.listdir(tmp_path / "hf"))]
    assert len(files) > 3  # several shards, the index and config.json
    assert sorted(synced[: before - 1]) == [f.replace(str(tmp_path / "hf"), tmp) for f in files]
    assert synced[before - 1] == tmp  # the directory's entries, then the rename
    assert synced[before:] == [str(tmp_path)]


def test_a_cast_that_overflows_is_refused_naming_the_tensor(hf_copy, tmp_path):
    large = np.full((64, 64), 0.01, np.float32)
    large[3, 5] = 1e5  # beyond float16's 65504
    shard = rewrite_shard(hf_copy, Q_PROJ, large)
    expected = re.escape(f"'{Q_PROJ}' in {shard} holds 100000, beyond the range of float16")
    with pytest.raises(CheckpointError, match=expected):
        to_orbax(hf_copy, tmp_path / "orbax16", "--dtype", "float16")
    assert not (tmp_path / "orbax16").exists()
    to_orbax(hf_copy, tmp_path / "orbax")
    with pytest.raises(CheckpointError, match=r"'layers\.attn\.q' \(model\.layers\.1\..*float16"):
        to_hf(tmp_path / "orbax", tmp_path / "hf16", "--dtype", "float16")
    assert not (tmp_path / "hf16").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "orbax"]


@pytest.mark.parametrize("command", ["hf-to-orbax", "orbax-to-hf"])
def test_an_output_below_a_file_is_one_error_line(
    command, converted, tmp_path, monkeypatch, capsys
):
    c, blocker = converted("gqa"), tmp_path / "a_file"
    blocker.write_text("not a directory")
    source = (
        ["--hf_dir", str(c.hf_dir)] if command == "hf-to-orbax" else ["--ckpt", str(c.ckpt_dir)]
    )
    out = blocker / "out"
    last = run_command(monkeypatch, capsys, command, *source, "--out", str(out))
    assert f"output directory {out} cannot be made: {blocker} is not a directory" in last
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_the_command_names_a_missing_directory_in_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    command = ["hf-to-orbax", "--hf_dir", str(missing), "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-m", "dga_jax.checkpoint.convert", *command],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m dga_jax.checkpoint.convert: error: ")
    assert str(missing / "config.json") in last


SHARD = "<the shard holding Q_PROJ>"
LLAMA3_NO_BANDS = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}
# case -> (file, change, a text the error holds besides the file). A change is a dict of
# top-level JSON keys to set (None deletes one), a byte count to truncate to, or new bytes.
DAMAGE = {
    "config_not_json": ("config.json", b"{", "JSON"),
    "config_no_hidden_size": ("config.json", {"hidden_size": None}, "'hidden_size'"),
    "llama3_rope_no_low_freq_factor": (
        "config.json",
        {"rope_scaling": LLAMA3_NO_BANDS},
        "rope_scaling.low_freq_factor",
    ),
    "heads_not_a_multiple": ("config.json", {"num_key_value_heads": 3}, "num_kv_heads=3"),
    "dynamic_rope_no_factor": (
        "config.json",
        {"rope_scaling": {"rope_type": "dynamic"}},
        "rope_scaling.factor",
    ),
    "index_not_json": (INDEX_FILE, b"{ oops", "JSON"),
    "index_no_weight_map": (INDEX_FILE, {"weight_map": None}, "weight_map"),
    "truncated_shard": (SHARD, 100, "safetensors"),
    "empty_shard": (SHARD, 0, "safetensors"),
    "garbage_shard": (SHARD, b"no tensors here", "safetensors"),
}


def damage(path: pathlib.Path, change: dict | int | bytes) -> None:
    """Applies one `DAMAGE` change to a file."""
    if isinstance(change, dict):
        content = {**json.loads(path.read_text()), **change}
        path.write_text(json.dumps({k: v for k, v in content.items() if v is not None}))
    elif isinstance(change, int):
        path.write_bytes(path.read_bytes()[:change])
    else:
        path.write_bytes(change)


def run_command(monkeypatch, capsys, *argv: str) -> str:
    """The convert command's last stderr line, once it has exited with code 2."""
    monkeypatch.setattr(sys, "argv", ["convert", *argv])
    with pytest.raises(SystemExit) as exited:
        _run_command()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("python -m dga_jax.checkpoint.convert: error: ")
    return last


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_input_is_one_error_line_naming_the_file(
    case, hf_copy, tmp_path, monkeypatch, capsys
):
    file, change, text = DAMAGE[case]
    path = pathlib.Path(tensor_files(hf_copy)[0][Q_PROJ]) if file == SHARD else hf_copy / file
    damage(path, change)
    out = tmp_path / "orbax"
    last = run_command(
        monkeypatch, capsys, "hf-to-orbax", "--hf_dir", str(hf_copy), "--out", str(out)
    )
    assert str(path) in last and text in last
    assert not out.exists()


def test_a_bad_shard_size_is_one_error_line(converted, tmp_path, monkeypatch, capsys):
    ckpt, out = converted("gqa").ckpt_dir, tmp_path / "hf"
    argv = ["orbax-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--max_shard_size", "5 gigs"]
    assert "invalid size '5 gigs'" in run_command(monkeypatch, capsys, *argv)
    assert not out.exists()


# model_config edits -> what the error names; the stored parameters are a 1-layer, untied tiny's.
CONFIG_EDITS = {
    "num_layers": ({"num_layers": 2}, r"'layers\.attn\.k' has shape \(1, .*gives \(2, "),
    "intermediate_size": (
        {"intermediate_size": 400},
        r"'layers\.mlp\.down' has shape \(1, 344, 128\); its model config gives \(1, 400, 128\)",
    ),
    "tie_embeddings": ({"tie_embeddings": True}, r"parameter\(s\) \['lm_head'\] not in"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_export_of_params_that_do_not_fit_the_stored_config_is_refused(
    case, tmp_path, monkeypatch, capsys
):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    save_model(Llama(ModelConfig.preset("tiny", num_layers=1), rngs=nnx.Rngs(0)), ckpt)
    damage(ckpt / "model_config" / "metadata", CONFIG_EDITS[case][0])
    last = run_command(monkeypatch, capsys, "orbax-to-hf", "--ckpt", str(ckpt), "--out", str(out))
    assert re.search(re.escape(str(ckpt / "params")) + ": .*" + CONFIG_EDITS[case][1], last), last
    assert not out.exists()


def test_an_export_removes_what_killed_exports_left(converted, tmp_path):
    # A killed export's temporary directory (a 7B model's worth of shards) stayed forever.
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    host = socket.gethostname()
    killed = tmp_path / f".hf.tmp-{host}-{ended.pid}-abc_1234"
    live = tmp_path / f".hf.tmp-{host}-{os.getpid()}-abc_1234"  # an export under way
    remote = tmp_path / f".hf.tmp-elsewhere-{ended.pid}-abc_1234"  # its pid means nothing here
    other = tmp_path / f".hf2.tmp-{host}-{ended.pid}-abc_1234"  # another destination's
    # An ended pid whose lock is held: an export in another PID namespace (a container's).
    locked = tmp_path / f".hf.tmp-{host}-{ended.pid}-def_5678"
    for directory in (killed, live, remote, other, locked):
        directory.mkdir()
        (directory / "model-00001-of-00002.safetensors").write_bytes(b"cut short")
    (tmp_path / f"{killed.name}.lock").write_text("")  # its export's lock, released
    lock = os.open(tmp_path / f"{locked.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        to_hf(converted("gqa").ckpt_dir, tmp_path / "hf")
    finally:
        os.close(lock)
    kept = ["hf", live.name, remote.name, other.name, locked.name, f"{locked.name}.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
