"""ModelEngine on a tiny model, every task end to end, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import dga_jax
from dga_jax import Llama, ModelConfig
from dga_jax.checkpoint.orbax_io import save_model
from dga_jax.errors import InputError
from dga_jax.eval import __main__ as cli
from dga_jax.eval.__main__ import build_tasks, main, parse_args, run_info
from dga_jax.eval.engine import ModelEngine, _score_rows
from dga_jax.eval.longbench import DATASETS


def test_scores_equal_each_sequence_alone_and_generation_is_generate(tiny_engine):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(3, 259, n).tolist() for n in (40, 300)]
    scores = tiny_engine.score(sequences)  # one padded batch, each row at its own length
    for ids, got in zip(sequences, scores, strict=True):
        logits = tiny_engine.model(np.asarray([ids]))[0, :-1]  # the sequence alone
        expected = jax.nn.log_softmax(logits)[np.arange(len(ids) - 1), np.array(ids[1:])]
        np.testing.assert_allclose(got.logprobs, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got.greedy, np.argmax(logits, -1) == np.array(ids[1:]))
    options = dict(stop_tokens=[2], batch_size=4, buckets=tiny_engine.buckets)
    expected = dga_jax.generate(tiny_engine.model, sequences, 4, **options)
    assert tiny_engine.generate(sequences, 4) == expected


def test_scoring_runs_the_lm_head_over_slices_of_the_positions():
    # The whole [B, T, V] logits at once were 33 GiB for LLaMA2-7B at 32K tokens and 8 rows:
    # slices of positions give the same scores (a last, padded slice too) in less memory.
    config = ModelConfig.preset("tiny", vocab_size=8192, max_position=512)
    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    tokens = np.zeros((4, 512), np.int32)
    lengths = np.array([512, 300, 97, 2])
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(0, config.vocab_size, n)
    args = (graphdef, state, tokens, lengths)
    whole, sliced = (_score_rows(*args, positions=p) for p in (512, 96))
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(sliced[0][row, : n - 1], whole[0][row, : n - 1], rtol=1e-6)
        np.testing.assert_array_equal(sliced[1][row, : n - 1], whole[1][row, : n - 1])
    compiled = {p: _score_rows.lower(*args, positions=p).compile() for p in (512, 96)}
    temps = {p: c.memory_analysis().temp_size_in_bytes for p, c in compiled.items()}
    logits_bytes = 4 * 512 * config.vocab_size * 4
    # (the prefill's own temporaries, which the whole logits partly reuse, are the most of both)
    assert temps[96] + logits_bytes / 8 < temps[512], (temps, logits_bytes)


def test_generation_takes_more_stop_tokens_and_min_new_tokens(tiny_engine):
    prompts = [[1, *range(40, 90)], [1, *range(90, 100)]]
    stop = tiny_engine.generate(prompts, 4)[0][0]  # row 0's greedy first token
    assert tiny_engine.generate(prompts, 4, stop_tokens=[stop])[0] == []
    held = tiny_engine.generate(prompts, 4, stop_tokens=[stop], min_new_tokens=1)
    assert held[0] and held[0][0] != stop
    options = dict(batch_size=4, buckets=tiny_engine.buckets, min_new_tokens=1)
    assert held == dga_jax.generate(tiny_engine.model, prompts, 4, stop_tokens=[2, stop], **options)


def test_sequences_past_max_length_are_refused(tiny_engine):
    # The engine's contract (prompt and new tokens within max_length, by default max_position),
    # which the tasks keep; a caller past it got a silently extrapolating model.
    assert tiny_engine.max_length == tiny_engine.model.config.max_position == 1024
    prompts = [[1, 2], [1] * 1020]
    message = r"sequence 1 of 1020 tokens and max_new_tokens=5 does not fit .* max_length=1024"
    with pytest.raises(ValueError, match=message):
        tiny_engine.generate(prompts, 5)
    with pytest.raises(ValueError, match=r"sequence 0 of 1025 tokens does not fit"):
        tiny_engine.score([[1] * 1025, [1, 2]])


@pytest.mark.parametrize(
    "max_length, match",
    [
        (1025, r"max_length=1025 is past the model's max_position=1024: it would extrapolate"),
        (0, r"max_length must be an int >= 2, got 0"),  # fell back to max_position silently
        (64.0, r"max_length must be an int >= 2, got 64.0"),
    ],
)
def test_a_max_length_past_the_models_positions_is_refused(tiny_engine, max_length, match):
    # score() ran past max_position silently where generate() refused it.
    with pytest.raises(ValueError, match=match):
        ModelEngine(tiny_engine.model, tiny_engine.tokenizer, max_length=max_length)


def test_streaming_models_take_any_max_length(tiny_engine):
    # LM-Infinite caps every RoPE distance, as generate() knows (it streams on).
    config = ModelConfig.preset("tiny", attention="lm_infinite", max_position=64)
    model = dga_jax.Llama(config, rngs=nnx.Rngs(0))
    assert ModelEngine(model, tiny_engine.tokenizer, max_length=4096).max_length == 4096


def test_scoring_names_the_sequence_with_an_id_outside_the_vocabulary(tiny_engine):
    # Batches run longest first: the batch-row index named another sequence (here 0).
    sequences = [[1, 2, 3, 4, 5, 6], [1, 2], [1, 2, 3], [1, 2, 999]]
    with pytest.raises(ValueError, match=r"^sequence 3 holds token id 999 at position 2"):
        tiny_engine.score(sequences)


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True])
def test_a_batch_size_that_is_not_a_positive_int_is_refused(tiny_engine, batch_size):
    # 0 failed at the first score call (range() step 0); 1.5 and True ran.
    with pytest.raises(ValueError, match=rf"batch_size must be a positive int, got {batch_size}"):
        ModelEngine(tiny_engine.model, tiny_engine.tokenizer, batch_size=batch_size)


def test_numpy_integers_are_taken_as_max_length_and_batch_size(tiny_engine):
    # Refused as "not an int" where generate() and Buckets take them.
    engine = ModelEngine(
        tiny_engine.model, tiny_engine.tokenizer, batch_size=np.int32(2), max_length=np.int64(64)
    )
    assert (engine.batch_size, engine.max_length) == (2, 64)
    assert (type(engine.batch_size), type(engine.max_length)) == (int, int)


def test_scoring_names_the_sequence_too_short_to_score(tiny_engine):
    with pytest.raises(ValueError, match=r"^sequence 1 has 1 tokens: .* at least 2"):
        tiny_engine.score([[1, 2, 3], [1], []])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_engine):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    save_model(tiny_engine.model, path)
    return path


def test_cli_writes_records_summary_table_and_plots(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--out", str(out)]
    flags += ["--tasks", "passkey,lines", "--passkey_lengths", "40", "--passkey_trials", "2"]
    flags += ["--lines_sizes", "3", "--lines_cases", "2", "--attention", "dense"]
    flags += ["--max_length", "1024", "--batch_size", "2"]
    main(flags)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("eval: passkey ") and ", lines " in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["info"]["attention"] == "dense" and summary["info"]["max_length"] == 1024
    assert {"passkey.jsonl", "lines.jsonl", "results.md", "passkey.png", "lines.png"} <= {
        p.name for p in out.iterdir()
    }
    assert (
        "| lines | prompt tokens | accuracy % | answer tokens argmax % | cases |"
        in (out / "results.md").read_text()
    )
    with pytest.raises(SystemExit) as exit_info:  # other settings into the same --out
        main([*flags, "--passkey_trials", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'passkey.settings.json'}: " in err and "task.trials 2 -> 3" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "passkey,nope"], "--tasks 'passkey,nope': each must be one of"),
        (["--tasks", "ppl", "--ppl_data", "/no/such/dir"], "'/no/such/dir' holds no documents"),
        (["--tasks", "ppl"], "--tasks ppl needs --ppl_data"),
        (["--tasks", "lines", "--lines_dir", "/nowhere"], "'/nowhere/200_lines.jsonl' not found"),
        (["--mesh", "3,-1,1,1"], "--mesh [3, -1, 1, 1] does not divide 1 devices"),
    ],
)
def test_cli_input_errors_name_the_problem(checkpoint, tmp_path, capsys, flags, message):
    base = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(base + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["longbench_e", "--longbench_dir", "{tmp}/typo"], "data directory '{tmp}/typo' does not"),
        (
            ["longbench_e", "--longbench_dir", "{tmp}/data", "--longbench_max_input", "1000"],
            "max_input 1000 and qasper's 128 new tokens do not fit the engine's max_length 1024",
        ),
        (["ppl", "--ppl_data", "{tmp}/data", "--ppl_window", "2048"], "ppl window 2048 must lie"),
    ],
)
def test_cli_checks_every_task_before_any_runs(checkpoint, tmp_path, capsys, flags, message):
    # A mistyped --longbench_dir or a window over --max_length was found only after the tasks
    # before it had run in full.
    (tmp_path / "data").mkdir()
    for name in DATASETS:
        (tmp_path / "data" / f"{name}_e.jsonl").write_text("")
    (tmp_path / "data" / "a.txt").write_text("a document")
    base = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--out", str(tmp_path)]
    base += ["--passkey_lengths", "40", "--passkey_trials", "1", "--tasks"]
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, f"passkey,{flags[0]}", *flags[1:]])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "passkey.jsonl").exists()


def model_loaded(*args, **kwargs):
    raise AssertionError("the model loaded before the task flags were checked")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--passkey_depths", "0,2"], "passkey depths must be one or more fractions in [0, 1]"),
        (["--lines_sizes", "4,4"], "lines sizes must be distinct, got [4] more than once"),
        (["--longbench_dir", "{tmp}", "--longbench_datasets", "nope"], "datasets ['nope']"),
        (["--longbench_dir", "{tmp}/typo"], "data directory '{tmp}/typo' does not exist"),
        (["--ppl_data", "{tmp}", "--ppl_window", "2048"], "ppl window 2048 must lie in [2, the"),
    ],
)
def test_cli_checks_the_task_flags_before_the_model_loads(
    checkpoint, tmp_path, capsys, monkeypatch, flags, message
):
    # The tasks were made from their flags only after the model had loaded (minutes for 7B).
    monkeypatch.setattr(cli, "load_model", model_loaded)
    (tmp_path / "a.txt").write_text("a document")
    for name in DATASETS:
        (tmp_path / f"{name}_e.jsonl").write_text("")
    base = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--out", str(tmp_path)]
    base += ["--tasks", "passkey,lines,longbench_e,ppl"]
    base += ["--longbench_dir", str(tmp_path), "--ppl_data", str(tmp_path)]  # flags: the last
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *flags])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_cli_max_length_past_max_position_extrapolates_knowingly(checkpoint, tmp_path, caplog):
    # --max_length 2048 on a 1024-position model: generation refused it mid-run, scoring
    # extrapolated silently; now the model is loaded with max_position 2048, with a warning.
    out = tmp_path / "out"
    flags = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--out", str(out)]
    flags += ["--tasks", "passkey", "--passkey_lengths", "40", "--passkey_trials", "1"]
    flags += ["--attention", "dense", "--max_length", "2048"]
    main(flags)
    assert "--max_length 2048 is past the model's max_position 1024" in caplog.text
    assert json.loads((out / "summary.json").read_text())["info"]["max_length"] == 2048


def test_cli_passkey_under_longloras_first_point_asks_for_lengths():
    # LongLoRA's points are 1000 tokens apart: none fit a 512-token window, and the error was
    # "passkey lengths must be filler sizes >= 0, got []", naming no flag.
    args = parse_args(["--checkpoint", "c", "--tokenizer", "byte", "--out", "o"])
    with pytest.raises(InputError, match="max_length 512; give --passkey_lengths"):
        build_tasks(args, 512)
    assert build_tasks(args, 2000)[0].lengths == [3072, 7168]


@pytest.mark.parametrize(
    "flag, value, least",
    [
        ("--chunk", "0", 1),
        ("--batch_size", "0", 1),
        ("--passkey_trials", "-1", 1),
        ("--lines_cases", "-1", 1),
        ("--max_length", "-5", 2),
        ("--ppl_window", "1", 2),
        ("--ppl_stride", "-3", 1),
        ("--ppl_max_docs", "0", 1),
        ("--lines_seed", "-1", 0),  # failed in NumPy after the tasks before lines had run
    ],
)
def test_cli_counts_out_of_range_name_their_flag(tmp_path, capsys, flag, value, least):
    base = ["--checkpoint", str(tmp_path), "--tokenizer", "byte", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, flag, value])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: must be at least {least}, got {value}" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("flag", ["--passkey_lengths", "--passkey_depths", "--mesh"])
def test_cli_lists_must_hold_a_number(tmp_path, capsys, flag):
    # An empty list (an unset shell variable) fell back to the default passkey lengths.
    base = ["--checkpoint", str(tmp_path), "--tokenizer", "byte", "--out", str(tmp_path)]
    problems = {"": "must list at least one number", "1,x": "must be a comma list of numbers"}
    for value, problem in problems.items():
        with pytest.raises(SystemExit):
            main([*base, flag, value])
        assert f"error: argument {flag}: {problem}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--longbench_datasets", "--tasks"])
def test_cli_name_lists_must_hold_a_name(tmp_path, capsys, flag):
    # `--longbench_datasets ""` (an unset shell variable) ran all 13 datasets.
    base = ["--checkpoint", str(tmp_path), "--tokenizer", "byte", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, flag, " , "])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: must list at least one name" in capsys.readouterr().err


def test_longbench_name_of_a_relative_checkpoint_is_its_directory(tmp_path, monkeypatch):
    (tmp_path / "ckpt_7b").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt_7b")
    data = tmp_path / "longbench"
    data.mkdir()
    for dataset in DATASETS:
        (data / f"{dataset}_e.jsonl").write_text("")
    flags = ["--checkpoint", ".", "--tokenizer", "byte", "--out", str(tmp_path / "out")]
    flags += ["--tasks", "longbench_e", "--longbench_dir", str(data)]
    (task,) = build_tasks(parse_args(flags), 4096)
    assert task.model_name == "ckpt_7b"  # was ".", refused as not one path component


def test_run_info_names_the_tokenizer_by_its_absolute_path(tmp_path, monkeypatch):
    # --tokenizer was kept as typed: `tok.model`, then the same file as /abs/tok.model, was
    # refused as another run's records, and `tok.model` in another directory resumed them.
    config = ModelConfig.preset("tiny")
    base = ["--checkpoint", str(tmp_path), "--out", "out", "--tokenizer"]
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path)
    typed = run_info(parse_args([*base, "tok.model"]), config, 64)
    assert typed == run_info(parse_args([*base, str(tmp_path / "tok.model")]), config, 64)
    assert run_info(parse_args([*base, "byte"]), config, 64)["tokenizer"] == "byte"
    monkeypatch.chdir(tmp_path / "b")
    assert run_info(parse_args([*base, "tok.model"]), config, 64) != typed


def test_python_dash_m_runs_the_cli(tmp_path):
    """`python -m dga_jax.eval` is the README's command: it must reach `main`, not just import."""
    command = [sys.executable, "-m", "dga_jax.eval", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--checkpoint" in result.stdout, result.stderr[-2000:]
    command = [sys.executable, "-m", "dga_jax.eval", "--checkpoint", str(tmp_path / "none")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "error: " in result.stderr, result.stderr[-2000:]


def test_generation_stops_at_the_checkpoints_eos_ids_too(tiny_engine):
    # Llama-3-Instruct ends a turn with <|eot_id|>, an eos id of its generation_config.json and
    # not its tokenizer's EOS: the engine stopped only at the tokenizer's, as HF's generate
    # does not.
    prompts = [[1, *range(40, 90)]]
    stop = tiny_engine.generate(prompts, 4)[0][0]  # the greedy first token
    config = tiny_engine.model.config.replace(eos_token_ids=(stop,))
    model = Llama(config, rngs=nnx.Rngs(0))  # the same weights as the fixture's
    engine = ModelEngine(model, tiny_engine.tokenizer, batch_size=4, buckets=tiny_engine.buckets)
    assert engine.generate(prompts, 4) == [[]]
    # A task's own stops replace them, as LongBench's pred.py's eos_token_id list does HF's.
    assert engine.generate(prompts, 4, stop_tokens=[2]) == tiny_engine.generate(prompts, 4)
