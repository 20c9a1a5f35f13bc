"""ModelEngine on a tiny model, every task end to end, and the command line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import dga_jax
from dga_jax.checkpoint.orbax_io import save_model
from dga_jax.eval.__main__ import main


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


def test_generation_takes_more_stop_tokens_and_min_new_tokens(tiny_engine):
    prompts = [[1, *range(40, 90)], [1, *range(90, 100)]]
    stop = tiny_engine.generate(prompts, 4)[0][0]  # row 0's greedy first token
    assert tiny_engine.generate(prompts, 4, stop_tokens=[stop])[0] == []
    held = tiny_engine.generate(prompts, 4, stop_tokens=[stop], min_new_tokens=1)
    assert held[0] and held[0][0] != stop
    options = dict(batch_size=4, buckets=tiny_engine.buckets, min_new_tokens=1)
    assert held == dga_jax.generate(tiny_engine.model, prompts, 4, stop_tokens=[2, stop], **options)


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
