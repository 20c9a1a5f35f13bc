"""The model-level benchmarks (`train_step.py`, `model_forward.py`, `prefill.py`) end to end at
small shapes: the chosen variants, layer count and dtype reach the compiled model, and bad
options are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("--lengths", "128", "--repeats", "2", "--group-size", "4")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, f"benchmarks/{script}.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _records(out: Path, name: str) -> list[dict]:
    (path,) = out.glob(f"{name}_*.json")
    return json.loads(path.read_text())["records"]


@pytest.mark.parametrize("script", ["train_step", "model_forward"])
def test_the_named_variants_run_in_turns(tmp_path, script):
    variants = "dense_blockwise,dga_xla"
    args = ("--variants", variants, "--layers", "1", "--dtype", "bfloat16", "--out", str(tmp_path))
    result = _run(script, *SMALL, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(tmp_path, script)
    assert [r["variant"] for r in records] == variants.split(",")
    for r in records:
        assert r["status"] == "ok" and len(r["times_ms"]) == 2 and r["median_ms"] > 0
    # DGA is the speedups' reference though named second: dense's row has the ratio.
    dense_row = next(line for line in result.stdout.splitlines() if "dense_blockwise" in line)
    dga_row = next(line for line in result.stdout.splitlines() if " dga_xla" in line)
    assert "x" in dense_row.split()[4] and dga_row.split()[4] == "—"


def test_a_variant_the_backend_rejects_is_recorded_and_the_rest_run(tmp_path):
    variants = "dga_pallas_gpu,dense_blockwise,dga_xla"  # no GPU here: the kernels are refused
    result = _run("train_step", *SMALL, "--variants", variants, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    failed, dense, dga = _records(tmp_path, "train_step")
    assert failed["status"].startswith("failed: ValueError: implementation='pallas_gpu'")
    assert failed["median_ms"] is None and failed["times_ms"] == []
    assert dense["status"] == dga["status"] == "ok" and dense["median_ms"] and dga["median_ms"]
    # The speedups' base is the first DGA variant that ran: dga_xla.
    dense_row = next(line for line in result.stdout.splitlines() if "dense_blockwise" in line)
    assert dense_row.split()[4] == f"{dense['median_ms'] / dga['median_ms']:.2f}x"


def test_layers_dtype_and_selection_reach_the_model_config():
    variants = load_script("variants")
    argv = ["--preset", "tiny", "--layers", "3", "--dtype", "bfloat16", "--selection", "streaming"]
    args = variants.parse_variant_args("test", [*argv, "--variants", "dense_cudnn,dga_pallas_gpu"])
    assert args.variants == ["dense_cudnn", "dga_pallas_gpu"]
    assert variants.first_dga(args.variants) == "dga_pallas_gpu"
    config = variants.variant_config(args, "dga_pallas_gpu")
    assert (config.num_layers, config.dtype) == (3, "bfloat16")
    assert (config.attention, config.attention_impl) == ("dga", "pallas_gpu")
    assert config.dga.selection == "streaming"
    assert variants.variant_config(args, "dense_cudnn").attention_impl == "cudnn"
    plain = variants.variant_config(variants.parse_variant_args("test", []), "dga_xla")
    assert (plain.num_layers, plain.dtype) == (2, "float32")  # the preset's


def test_prefill_takes_the_first_dga_variant(tmp_path):
    args = ("--variants", "dense_xla,dga_xla", "--selection", "streaming", "--out", str(tmp_path))
    result = _run("prefill", *SMALL, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dga_xla" in result.stdout.splitlines()[0]
    assert json.loads(next(tmp_path.glob("prefill_*.json")).read_text())["config"]["selection"] == (
        "streaming"
    )
    result = _run("prefill", *SMALL, "--variants", "dense_xla", "--out", str(tmp_path))
    assert result.returncode != 0 and "names no dga_*" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("--variants", "dga_xla,dense_fast"), "--variants: unknown ['dense_fast']"),
        (("--layers", "0"), "argument --layers: must be >= 1, got 0"),
        (("--dtype", "float16"), "invalid choice: 'float16'"),
    ],
)
def test_bad_options_are_named(args, message):
    result = _run("train_step", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--preset", "foo"), "argument --preset: invalid choice: 'foo'"),
        (("--lengths", "4096,abc"), "argument --lengths: not an int: 'abc'"),
        (("--lengths", ","), "argument --lengths: no lengths in ','"),
        (("--repeats", "0"), "argument --repeats: must be >= 1, got 0"),
        (("--group-size", "0"), "--group-size / --focal-ratio: "),
        (("--focal-ratio", "1.5"), "--group-size / --focal-ratio: "),
    ],
)
def test_bad_values_are_refused_before_any_variant_runs(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        load_script("variants").parse_variant_args("test", list(args))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_attention_shapes_no_variant_could_run_are_refused(capsys):
    with pytest.raises(SystemExit):
        load_script("attention").parse_args(["--heads", "3", "--kv-heads", "2"])
    assert "--heads 3 must be a multiple of --kv-heads 2" in capsys.readouterr().err
