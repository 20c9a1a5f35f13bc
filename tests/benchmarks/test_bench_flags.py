"""Flags no run could use are argparse errors naming the flag, before any model is built or
compiled: not a default taken silently in their place, nor a traceback later in the run."""

from __future__ import annotations

import pytest

from tests.benchmarks.scripts import load_script


def _parse(script: str, argv: list[str]):
    return load_script(script).parse_args(argv)


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("generate", ["--shortest", "0"], "argument --shortest: must be >= 1, got 0"),
        ("generate", ["--longest", "0"], "argument --longest: must be >= 1, got 0"),
        ("generate", ["--bucket", "0"], "argument --bucket: must be >= 1, got 0"),
        ("generate", ["--new-tokens", "0"], "argument --new-tokens: must be >= 1, got 0"),
        ("generate", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (
            "generate",
            ["--shortest", "8", "--longest", "9", "--prompts", "3"],
            "--shortest 8 to --longest 9 holds fewer than --prompts 3 distinct lengths",
        ),
        ("importance", ["--tiles", "64"], "argument --tiles: not rows x keys (e.g. 64x64): '64'"),
        (
            "importance",
            ["--tiles", "64x64,48x64"],
            "argument --tiles: '48x64': ImportanceTile.rows",
        ),
        ("importance", ["--tiles", "64x8"], "'64x8': ImportanceTile.keys must be a power of two"),
        ("importance", ["--heads", "0"], "argument --heads: must be >= 1, got 0"),
        ("importance", ["--group-size", "0"], "argument --group-size: must be >= 1, got 0"),
        ("importance", ["--heads", "3", "--kv-heads", "2"], "--heads 3 must be a multiple of"),
        ("decode", ["--warmup", "-1"], "argument --warmup: must be >= 1, got -1"),
        ("decode", ["--warmup", "0"], "argument --warmup: must be >= 1, got 0"),
        ("decode", ["--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
        (
            "attention",
            ["--impls", "dga_xla@0x64"],
            "--impls dga_xla@0x64: BlockSizes.block_q must be a positive int, got 0",
        ),
        ("attention", ["--impls", ""], "--impls: none given"),
        ("attention", ["--modes", ","], "--modes: none given"),
        ("attention", ["--max-seconds", "0"], "argument --max-seconds: must be a finite number"),
        ("attention", ["--max-seconds", "nan"], "argument --max-seconds: must be a finite number"),
        (
            "generate",
            ["--longest", "32768", "--new-tokens", "2"],
            "need 32769 positions, past the tiny model's max_position=32768",
        ),
        (
            "profile_attention",
            ["--lengths", "1,256"],
            "--lengths [1]: too short for a band walk (no raw entries) to profile",
        ),
        ("profile_attention", ["--interpret"], "--interpret runs the Pallas kernels"),
        ("profile_attention", ["--blocks", "64"], "--blocks '64' is not RxK[wW][sS]"),
        (
            "profile_attention",
            ["--blocks", "64x64w4"],
            "--blocks 64x64w4: Triton's warps and stages apply to pallas_gpu only",
        ),
        (
            "profile_attention",
            ["--implementation", "pallas_gpu", "--blocks", "64x64s0"],
            "--blocks 64x64s0: BlockSizes.num_stages must be a positive int, got 0",
        ),
    ],
)
def test_a_flag_no_run_could_use_is_named(capsys, script, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _parse(script, [*argv, "--interpret"] if script == "importance" else argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_good_flags_are_kept():
    # As many distinct lengths as prompts: 1..16 holds 16.
    args = _parse("generate", ["--shortest", "1", "--longest", "16", "--prompts", "16"])
    assert (args.shortest, args.longest, args.prompts, args.bucket) == (1, 16, 16, 1)
    args = _parse("importance", ["--interpret", "--tiles", "64x64, 16x32"])
    assert args.tiles == [(64, 64), (16, 32)]
    assert _parse("importance", ["--interpret"]).tiles == [(64, 64)]
    assert _parse("decode", ["--warmup", "1", "--dtype", "bfloat16"]).warmup == 1


def test_decode_models_hold_the_longest_prompt_and_its_steps():
    # tiny (max_position 32K) decoded its default 32K prompt 72 positions past it.
    decode = load_script("decode")
    args = _parse("decode", [])
    assert decode.model_config(args, "dga").max_position == 32768 + 8 + 64
    args = _parse("decode", ["--lengths", "1024"])
    assert decode.model_config(args, "dense").max_position == 32768  # the preset's


@pytest.mark.parametrize(
    "script, argv",
    [
        ("attention", []),
        ("baselines", []),
        ("decode", []),
        ("generate", []),
        ("importance", ["--interpret"]),
        ("profile_attention", []),
    ],
)
def test_an_out_folder_that_cannot_be_made_is_refused_before_the_run(
    capsys, tmp_path, script, argv
):
    """A file as --out failed when the results were written, after the whole run."""
    taken = tmp_path / "results"
    taken.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        _parse(script, [*argv, "--out", str(taken)])
    assert exit_info.value.code == 2
    assert f"argument --out: cannot make folder '{taken}'" in capsys.readouterr().err
    assert _parse(script, [*argv, "--out", str(tmp_path / "new" / "dir")]).out.is_dir()
