"""`benchmarks/aot_compile.py`'s flags and results files, and `dga_jax.aot`'s checks that need no
compiler: what a user's bad input gets before a half-hour matrix of compiles starts, and what a
compiler without a memory analysis gets. No target is compiled here (no `aot` mark: the main
suite runs these)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from dga_jax import aot
from dga_jax.compile_stats import MEMORY_FIELDS
from tests.benchmarks.scripts import load_script

aot_compile = load_script("aot_compile")
NOTHING = ["--targets", "", "--tiny-lengths", "", "--recipes", "", "--long-recipes", ""]


def _parse(monkeypatch, *flags: str):
    monkeypatch.setattr(sys, "argv", ["aot_compile.py", *NOTHING, *flags])
    return aot_compile._parse_args()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recipes", "v5p"], r"--recipes: 'v5p' is not TARGET:CHIPS"),
        (["--recipes", "v5p:16"], r"v5p: chips must be one of \[4, 8\], got 16"),
        (["--recipes", "h100:0"], r"--recipes: must be >= 1, got 0"),
        (["--long-recipes", "v5p:4"], r"'v5p:4' is not TARGET:CHIPS:STRATEGY\[:REMAT\]"),
        (["--long-recipes", "v5p:4:ring"], r"'v5p:4:ring': strategy must be one of"),
        (["--long-recipes", "v5p:4:dga:most"], r"'v5p:4:dga:most': remat must be one of"),
        (["--long-recipes", "v5e:2:dga"], r"v5e: chips must be one of \[4, 8\], got 2"),
        (["--selections", "globl"], r"unknown selections \['globl'\]"),
        (["--blocks", "64"], r"'64' is not QxK"),
        (["--blocks", "64x64w3"], r"'64x64w3': BlockSizes.num_warps must be a power of two"),
        (["--long-length", "0"], r"--long-length: must be >= 1, got 0"),
    ],
)
def test_bad_flags_are_refused_before_any_compile(monkeypatch, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        _parse(monkeypatch, *flags)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_out_that_is_a_file_is_refused_before_any_compile(monkeypatch, capsys, tmp_path):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    with pytest.raises(SystemExit):
        _parse(monkeypatch, "--out", str(taken))
    assert f"--out: cannot make folder '{taken}'" in capsys.readouterr().err


def test_good_flags_parse(monkeypatch, tmp_path):
    args = _parse(
        monkeypatch,
        *("--recipes", "v5p:4,h100:3", "--long-recipes", "v5p:8:dga:full,h100:2:ulysses:"),
        *("--blocks", "64x32,128x64w4s3", "--selections", "streaming"),
        *("--out", str(tmp_path / "new")),
    )
    assert args.recipes == [("v5p", 4), ("h100", 3)]
    assert args.long_recipes == [("v5p", 8, "dga", "full"), ("h100", 2, "ulysses", None)]
    assert (args.blocks[0].block_q, args.blocks[0].block_k) == (64, 32)
    assert args.blocks[0].launch == {} and args.blocks[1].launch == dict(num_warps=4, num_stages=3)
    assert [aot_compile.blocks_label(b) for b in args.blocks] == ["64x32", "128x64w4s3"]
    assert args.selections == ["streaming"] and args.out.is_dir()


def _report(label: str) -> aot.CompileReport:
    return aot.CompileReport(label, "v5e", ok=True, seconds=1.0)


def test_an_interrupted_write_keeps_the_previous_results(monkeypatch, tmp_path):
    aot_compile._write([_report("first")], tmp_path)
    before = (tmp_path / "aot_compile.json").read_text()

    def half_then_full_disk(path: Path, text: str) -> None:
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        aot_compile._write([_report("first"), _report("second")], tmp_path)
    assert (tmp_path / "aot_compile.json").read_text() == before
    assert json.loads(before)["reports"][0]["label"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aot_compile.json", "aot_compile.md"]


@pytest.mark.parametrize(
    "target, chips, message",
    [
        ("h100", 0, r"h100: chips must be an int >= 1, got 0"),
        ("h200", -2, r"h200: chips must be an int >= 1, got -2"),
        ("v6e", 16, r"v6e: chips must be one of \[4, 8\], got 16"),
        ("H100", 1, r"target must be one of \['h100', 'h200', .*got 'H100'"),
    ],
)
def test_target_devices_name_a_bad_target_or_chip_count(target, chips, message):
    with pytest.raises(ValueError, match=message):
        aot.target_devices(target, chips=chips)


class _Compiled:
    def __init__(self, analysis):
        self.analysis = analysis

    def memory_analysis(self):
        return self.analysis


class _Lowered:
    def __init__(self, analysis):
        self.analysis = analysis

    def compile(self, compiler_options):
        return _Compiled(self.analysis)


class _Analysis:
    def __init__(self, **sizes):
        self.__dict__.update(sizes)


_SIZES = dict.fromkeys(MEMORY_FIELDS, 0)


@pytest.mark.parametrize(
    "analysis", [None, _Analysis(**{**_SIZES, "temp_size_in_bytes": None}), _Analysis()]
)
def test_a_compile_without_a_memory_analysis_is_reported(analysis):
    """JAX returns None where a backend has no analysis; its structure is not fixed either."""
    tpu = aot.compile_report("no analysis", _Lowered(analysis), "v5e")
    assert tpu.ok and tpu.peak_bytes is None and tpu.temp_bytes is None  # XLA:TPU checks HBM
    assert str(tpu).startswith("ok   v5e no analysis")
    gpu = aot.compile_report("no analysis", _Lowered(analysis), "h100")
    assert not gpu.ok and "h100's device memory unchecked" in gpu.error


def test_a_config_over_a_gpus_memory_names_the_bytes_per_device():
    analysis = _Analysis(**{**_SIZES, "argument_size_in_bytes": 90 * aot.GIB})
    report = aot.compile_report("7B", _Lowered(analysis), "h100")
    assert not report.ok and report.peak_bytes == 90 * aot.GIB
    assert report.error == (
        "needs 96,636,764,160 bytes (90.00 GiB) per device; h100 has 84,942,979,072 (79.11 GiB)"
    )
