"""Passkey, lines and perplexity: prompts against the reference formats, scoring, resuming."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from dga_jax.errors import InputError, MissingInputError
from dga_jax.eval import Lines, Passkey, Perplexity, evaluate, longlora_lengths, run_task
from dga_jax.eval import __main__ as cli
from dga_jax.eval.engine import TokenScores
from dga_jax.eval.lines import HEADER, last_integer, lines_case, lines_prompt
from dga_jax.eval.passkey import TASK_LINE, passkey_prompt
from dga_jax.eval.ppl import position_buckets, windows
from dga_jax.eval.runner import read_records
from dga_jax.eval.task import json_text
from tests.eval.conftest import OracleEngine, PromptCounter, lines_answer, passkey_answer

UNFIT = "prompt longer than the model's window"


def longlora_prompt(n_garbage: int, seed: int) -> tuple[str, str]:
    """LongLoRA's generate_prompt_landmark, transcribed (numpy's global RNG)."""
    state = np.random.get_state()  # noqa: NPY002 (the original's global RNG)
    np.random.seed(seed)  # noqa: NPY002 (the original's global RNG)
    n_prefix = np.random.randint(0, n_garbage)  # noqa: NPY002 (the original's global RNG)
    garbage = (
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    )
    inf = " ".join([garbage] * 5000)
    key = np.random.randint(1, 50000)  # noqa: NPY002 (the original's global RNG)
    lines = [
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.",  # noqa: E501
        inf[:n_prefix],
        f"The pass key is {key}. Remember it. {key} is the pass key.",
        inf[: n_garbage - n_prefix],
        "What is the pass key? The pass key is",
    ]
    np.random.set_state(state)  # noqa: NPY002 (the original's global RNG)
    return "\n".join(lines), str(key)


def test_passkey_prompt_is_longloras():
    text, key = passkey_prompt(60, 0)
    assert text == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.\n"
        "The grass is green. The sky is blue. The sun\n"
        "The pass key is 43568. Remember it. 43568 is the pass key.\n"
        "The grass is gre\n"
        "What is the pass key? The pass key is"
    )
    assert key == 43568
    for chars, seed in [(3072, 0), (7168, 4), (1000, 9)]:
        text, key = passkey_prompt(chars, seed)
        assert (text, str(key)) == longlora_prompt(chars, seed)
    assert longlora_lengths(4096) == [3072, 7168, 10240, 14336]
    with pytest.raises(InputError, match="the passkey interval must be an integer >= 1, got 0"):
        longlora_lengths(4096, interval=0)  # ZeroDivisionError before


def test_passkey_depth_places_the_key_and_keeps_the_trials_key():
    for depth in (0.0, 0.5, 1.0):
        text, key = passkey_prompt(400, 3, depth)
        prefix = text.split("\n")[1]
        assert len(prefix) == round(400 * depth)
        assert key == passkey_prompt(400, 3)[1]


def test_passkey_scores_exact_token_matches_and_skips_what_does_not_fit(tmp_path):
    engine = OracleEngine(passkey_answer, max_length=700)
    task = Passkey([100, 2000], trials=3, depths=[0.0, 1.0])
    summary, problems, now = run_task(task, engine, tmp_path)
    assert now == 6 and problems.counts == {"prompt longer than the model's window": 6}
    assert summary.metrics["accuracy"] == 1.0
    assert set(engine.generated) == {len(str(passkey_prompt(100, t)[1])) for t in range(3)}
    for record in map(json.loads, (tmp_path / "passkey.jsonl").read_text().splitlines()):
        answer = np.array(record["answer_ids"])  # teacher-forced: the oracle's scores of it
        assert record["answer_logprob"] == pytest.approx(-answer.sum() / 100)
        assert record["answer_token_accuracy"] == pytest.approx(np.mean(answer % 2 == 0))
    assert (tmp_path / "passkey_grid.png").stat().st_size > 0
    wrong = OracleEngine(lambda p: passkey_answer(p)[:-1] + "0", max_length=700)
    summary, _, _ = run_task(task, wrong, tmp_path / "wrong")
    keys = [
        json.loads(line)["pass_key"]
        for line in (tmp_path / "wrong/passkey.jsonl").read_text().splitlines()
    ]
    assert summary.metrics["accuracy"] == np.mean([k % 10 == 0 for k in keys])


def test_a_passkey_cell_without_records_is_null_in_strict_json(tmp_path):
    # A (depth, length) cell whose every trial was skipped is NaN in the grid: summary.json
    # held a bare NaN, which JSON readers other than Python's refuse.
    task = Passkey([100, 200], trials=1, depths=[0.0, 1.0])
    run_task(task, OracleEngine(passkey_answer), tmp_path)
    records = list(read_records(tmp_path / "passkey.jsonl").values())
    kept = [r for r in records if (r["depth"], r["garbage_chars"]) != (1.0, 200)]
    grid = task.summarize(kept, tmp_path).metrics["grid"]
    assert math.isnan(grid["accuracy"][1][1])

    def refuse(constant):
        raise ValueError(constant)

    text = json_text({"grid": grid, "stderr": float("inf"), "rows": (1.5, float("-inf"))})
    strict = json.loads(text, parse_constant=refuse)
    assert strict["grid"]["accuracy"] == [[100.0, 100.0], [100.0, None]]
    assert (strict["stderr"], strict["rows"]) == (None, [1.5, None])


def test_lines_format_and_last_integer_parse():
    case = lines_case(3, np.random.default_rng([0, 3]))
    lines = case["prompt"][len(HEADER) :].split("\n")
    assert case["prompt"].startswith(HEADER) and HEADER.endswith("record start:\n\n")
    assert all(line.startswith("line ") and ": REGISTER_CONTENT is <" in line for line in lines[:3])
    name, position = case["random_idx"]
    assert lines[position] == f"line {name}: REGISTER_CONTENT is <{case['expected_number']}>"
    assert case["prompt"].endswith(
        f"\n\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {name}? "
        "I need the number. "
    )
    assert last_integer("line 3 is <2416>.") == 2416
    assert last_integer("12 then 7.5") == 5
    assert last_integer("no number") == -1


# The start and end of LongChat's longeval/evaluation/lines/testcases/200_lines.jsonl, case 0.
SHIPPED_START = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line "
    "index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. "
    "For each line index, memorize its corresponding <REGISTER_CONTENT>. At the end of the "
    "record, I will ask you to retrieve the corresponding <REGISTER_CONTENT> of a certain line "
    "index. Now the record start:\n\nline grotesque-classmate: REGISTER_CONTENT is <42527>\n"
    "line imperfect-bull: REGISTER_CONTENT is <3119>\n"
)
SHIPPED_END = (
    "line oval-underpants: REGISTER_CONTENT is <33851>\n\nNow the record is over. Tell me what "
    "is the <REGISTER_CONTENT> in line torpid-kid? I need the number. "
)


def test_lines_prompt_is_the_shipped_cases_format():
    ids = ["grotesque-classmate", "imperfect-bull", "torpid-kid", "oval-underpants"]
    prompt = lines_prompt(ids, [42527, 3119, 2416, 33851], target=2)
    assert prompt.startswith(SHIPPED_START) and prompt.endswith(SHIPPED_END)
    assert "line torpid-kid: REGISTER_CONTENT is <2416>\n" in prompt


def test_lines_reads_shipped_cases_and_counts_bad_ones(tmp_path):
    good = lines_case(4, np.random.default_rng(1))
    records = [json.dumps(good), "{not json", json.dumps({"prompt": "x"}), json.dumps(good)]
    (tmp_path / "4_lines.jsonl").write_text("\n".join(records) + "\n")
    task = Lines([4], testcases_dir=str(tmp_path))
    summary, problems, _ = run_task(task, OracleEngine(lines_answer), tmp_path / "out")
    assert summary.metrics["accuracy"] == 1.0 and problems.counts == {
        "malformed lines test case": 2
    }
    assert problems.where["malformed lines test case"] == [
        f"{tmp_path}/4_lines.jsonl:2",
        f"{tmp_path}/4_lines.jsonl:3",
    ]
    with pytest.raises(MissingInputError, match="5_lines.jsonl.*LongChat"):
        Lines([4, 5], testcases_dir=str(tmp_path))


def test_a_shipped_case_that_is_not_utf8_is_counted_not_fatal(tmp_path):
    # The file was read as text: one bad byte ended the task with a decode error naming no file.
    good = json.dumps(lines_case(4, np.random.default_rng(1))).encode()
    (tmp_path / "4_lines.jsonl").write_bytes(good + b"\n\xff\xfe not utf-8\n" + good + b"\n")
    task = Lines([4], testcases_dir=str(tmp_path))
    summary, problems, now = run_task(task, OracleEngine(lines_answer), tmp_path / "out")
    assert now == 2 and summary.metrics["accuracy"] == 1.0
    assert problems.where == {"malformed lines test case": [f"{tmp_path}/4_lines.jsonl:2"]}


def test_blank_lines_between_shipped_cases_are_no_cases(tmp_path):
    # Each blank line was counted as a malformed test case.
    good = json.dumps(lines_case(4, np.random.default_rng(1)))
    (tmp_path / "4_lines.jsonl").write_text(f"{good}\n\n{good}\n \r\n{{not json\n\n")
    task = Lines([4], testcases_dir=str(tmp_path))
    summary, problems, now = run_task(task, OracleEngine(lines_answer), tmp_path / "out")
    assert now == 2 and summary.metrics["accuracy"] == 1.0
    assert problems.where == {"malformed lines test case": [f"{tmp_path}/4_lines.jsonl:5"]}


def longlora_starts(n: int, seq_length: int, sliding_window: int) -> list[int]:
    """LongLoRA eval.py's get_as_batch window starts, transcribed."""
    all_ix = list(range(0, n - seq_length, sliding_window))
    all_ix.pop()
    return all_ix


def test_ppl_windows_follow_each_convention():
    assert windows(10, 4, 2, "stride") == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows(10, 4, 2, "longlora") == [(0, 4, 1), (2, 6, 1)]
    for n, window, stride in [(1000, 512, 256), (12288, 4096, 256), (523, 64, 7), (600, 512, 44)]:
        starts = [start for start, _, _ in windows(n, window, stride, "longlora")]
        assert starts == longlora_starts(n, window, stride)
    assert windows(600, 512, 256, "longlora") == []  # one start below n - window, dropped
    scored = sum(end - start - first for start, end, first in windows(1000, 64, 48, "stride"))
    assert scored == 999  # every token but the first, once
    assert position_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_ppl_disjoint_windows_never_end_in_a_one_token_window(tmp_path):
    # stride == window on k * window + 1 tokens: a last window [n - 1, n) predicts nothing
    # (and the model engine refuses sequences under 2 tokens)
    assert windows(9, 4, 4, "stride") == [(0, 4, 1), (4, 8, 1)]
    for n, window in [(9, 4), (33, 16), (65, 8), (2, 2)]:
        assert all(end - start >= 2 for start, end, _ in windows(n, window, window, "stride"))
    (tmp_path / "a.txt").write_text("abcdefgh")  # BOS + 8 bytes: 9 tokens
    summary, _, _ = run_task(
        Perplexity(str(tmp_path), window=4, stride=4), StrictOracle(None, 4), tmp_path / "out"
    )
    ids = np.array([1] + [3 + ord(c) for c in "abcdefgh"])
    assert summary.metrics["scored_tokens"] == 6  # positions 1-3 and 5-7
    expected = (ids[1:4].sum() + ids[5:8].sum()) / 600
    assert summary.metrics["ppl"] == pytest.approx(math.exp(expected))


class StrictOracle(OracleEngine):
    """An oracle that refuses what `ModelEngine.score` refuses: a sequence under 2 tokens."""

    def score(self, sequences):
        if any(len(s) < 2 for s in sequences):
            raise ValueError("every scored sequence needs at least 2 tokens")
        return super().score(sequences)


def test_ppl_matches_a_hand_computation(tmp_path):
    docs = tmp_path / ".cache" / "docs"  # hidden files are skipped below the directory only
    docs.mkdir(parents=True)
    (docs / ".hidden.txt").write_text("not a document")
    (docs / "a.txt").write_text("abcdefghij")
    (docs / "empty.txt").write_text("")
    engine = OracleEngine(None, max_length=4)  # token t costs t / 100 nats
    ids = np.array([1] + [3 + ord(c) for c in "abcdefghij"])  # BOS + bytes
    stride = run_task(Perplexity(str(docs), stride=2), engine, tmp_path / "s")
    assert stride[0].metrics["ppl"] == pytest.approx(math.exp(ids[1:].mean() / 100))
    assert stride[1].counts == {"empty document": 1}
    longlora = run_task(
        Perplexity(str(docs), convention="longlora", stride=3), engine, tmp_path / "l"
    )
    means = [ids[s + 1 : s + 4].mean() / 100 for s in longlora_starts(len(ids), 4, 3)]
    assert len(means) == 2
    assert longlora[0].metrics["ppl"] == pytest.approx(math.exp(np.mean(means)))
    with pytest.raises(MissingInputError, match="no-such-dir.*expected .txt files"):
        Perplexity(str(tmp_path / "no-such-dir"))


def test_longlora_skips_a_document_without_a_window_after_the_last_start_is_dropped(tmp_path):
    (tmp_path / "short.txt").write_text("abcdef")  # 7 tokens: starts [0], dropped
    (tmp_path / "long.txt").write_text("abcdefg")  # 8 tokens: starts [0, 3], 0 kept
    task = Perplexity(str(tmp_path), window=4, stride=3, convention="longlora")
    summary, problems, _ = run_task(task, OracleEngine(None, max_length=4), tmp_path / "out")
    assert problems.counts == {"document too short for a 4-token window": 1}
    assert problems.where["document too short for a 4-token window"] == [
        str(tmp_path / "short.txt")
    ]
    assert summary.metrics["documents"] == 1 and summary.metrics["scored_tokens"] == 3


def test_ppl_names_a_shard_record_by_its_number_not_as_a_line(tmp_path):
    # Blank lines are not records: record 3 was reported as `s.jsonl:3`, a blank line.
    good = json.dumps({"text": "hello world " * 4, "meta": {}})
    short = json.dumps({"text": "a", "meta": {}})
    shard = tmp_path / "s.jsonl"
    shard.write_text(f"{good}\n\n\n{good}\n{{broken\n{short}\n")
    task = Perplexity(str(shard), window=4, stride=1, convention="longlora")
    _, problems, _ = run_task(task, OracleEngine(None, max_length=4), tmp_path / "out")
    assert problems.where == {
        "shard record skipped (malformed)": [f"{shard} record 3"],
        "document too short for a 4-token window": [f"{shard} record 4"],
    }
    assert set(read_records(tmp_path / "out" / "ppl.jsonl")) == {f"{shard}:1", f"{shard}:2"}


@pytest.mark.parametrize(
    "stride, convention", [(0, "stride"), (-3, "stride"), (5, "stride"), (5, "longlora")]
)
def test_ppl_stride_must_lie_between_1_and_the_window(tmp_path, stride, convention):
    (tmp_path / "a.txt").write_text("abcdefghijklmnopqrstuvwxyz")
    task = Perplexity(str(tmp_path), window=4, stride=stride, convention=convention)
    message = f"ppl stride {stride} must lie in [1, the window of 4 tokens]"
    with pytest.raises(ValueError, match=re.escape(message)):
        run_task(task, OracleEngine(None, max_length=64), tmp_path / "out")
    assert not (tmp_path / "out" / "ppl.jsonl").exists()
    longlora = Perplexity(str(tmp_path), window=4, convention="longlora")  # stride 256
    with pytest.raises(ValueError, match=r"stride 256 \(the longlora default: give a stride\)"):
        run_task(longlora, OracleEngine(None, max_length=64), tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape("ppl window 1 must lie in [2, the model's")):
        run_task(Perplexity(str(tmp_path), window=1), OracleEngine(None, 64), tmp_path / "out")


def passkey_task(tmp_path):
    """4 trials that fit OracleEngine(max_length=1500), 2 that do not."""
    return Passkey([40, 80, 2000], trials=2)


def lines_task(tmp_path):
    """3 shipped cases and a malformed one."""
    rng = np.random.default_rng(2)
    cases = [json.dumps(lines_case(4, rng)) for _ in range(3)]
    (tmp_path / "4_lines.jsonl").write_text("\n".join([*cases, "{not json"]) + "\n")
    return Lines([4], testcases_dir=str(tmp_path))


def ppl_task(tmp_path):
    """An empty document, then 4 of which max_documents takes the first 3."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("")
    for i in range(4):
        (docs / f"doc{i}.txt").write_text(f"doc {i} " * 4)
    return Perplexity(str(docs), window=8, max_documents=3)


def run_counting(task, engine: OracleEngine, out) -> tuple[int, dict, int]:
    """run_task's (examples evaluated, skipped report), and the prompts it tokenized."""
    before = engine.tokenizer.prompts
    _, problems, now = run_task(task, engine, out)
    return now, problems.report(), engine.tokenizer.prompts - before


@pytest.mark.parametrize(
    "make, answer, marker",
    [
        (passkey_task, passkey_answer, TASK_LINE),
        (lines_task, lines_answer, HEADER),
        (ppl_task, None, "doc "),
    ],
)
def test_a_rerun_tokenizes_only_the_pending_prompts(tmp_path, make, answer, marker):
    task, engine = make(tmp_path), OracleEngine(answer, max_length=1500)
    engine.tokenizer = PromptCounter(marker)
    out, path = tmp_path / "out", tmp_path / "out" / f"{task.name}.jsonl"
    now, skipped, tokenized = run_counting(task, engine, out)
    unfit = skipped.get(UNFIT, {"count": 0})["count"]  # tokenized, then found too long
    assert now >= 3 and tokenized == now + unfit and skipped
    ids = set(read_records(path))
    assert run_counting(task, engine, out) == (0, skipped, unfit)  # all done
    path.write_text(path.read_text().splitlines(keepends=True)[0])  # one record kept
    assert run_counting(task, engine, out) == (len(ids) - 1, skipped, len(ids) - 1 + unfit)
    assert set(read_records(path)) == ids  # the same examples (ppl: the same max_documents)


def test_a_rerun_resumes_and_redoes_a_line_cut_by_a_crash(tmp_path):
    task = Passkey([50], trials=4)
    evaluate([task], OracleEngine(passkey_answer), tmp_path)
    path = tmp_path / "passkey.jsonl"
    full = path.read_text()
    assert run_task(task, OracleEngine(passkey_answer), tmp_path)[2] == 0
    path.write_text(full[: full.rindex("\n", 0, -1) + 10])  # the last line cut short
    summary, _, now = run_task(task, OracleEngine(passkey_answer), tmp_path)
    assert now == 1 and summary.metrics["accuracy"] == 1.0
    assert len({json.loads(line)["id"] for line in path.read_text().splitlines()[:3]}) == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tasks"]["passkey"]["metrics"]["accuracy"] == 1.0


def test_a_rerun_redoes_a_line_cut_inside_a_multibyte_character(tmp_path):
    engine = OracleEngine(lambda p: lines_answer(p) + " Voilà, café.")
    task = Lines([3], cases=3)
    run_task(task, engine, tmp_path)
    path = tmp_path / "lines.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex("é".encode()) + 1])  # half of the last line's "é"
    assert len(read_records(path)) == 2
    summary, _, now = run_task(task, engine, tmp_path)
    assert now == 1 and summary.metrics["accuracy"] == 1.0 and len(read_records(path)) == 3


def stale_docs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the quick brown fox jumps over the lazy dog " * 3)
    return str(docs)


def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path):
    docs, engine, out = stale_docs(tmp_path), OracleEngine(None, max_length=64), tmp_path / "out"
    run_task(Perplexity(docs, window=8, stride=4), engine, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    settings = re.escape(str(out / "ppl.settings.json"))
    changed = "task.convention 'stride' -> 'longlora'; task.stride 4 -> 8; task.window 8 -> 32"
    with pytest.raises(InputError, match=f"^{settings}: .*{re.escape(changed)}"):
        run_task(Perplexity(docs, window=32, stride=8, convention="longlora"), engine, out)
    with pytest.raises(InputError, match="max_length 64 -> 128"):
        run_task(Perplexity(docs, window=8, stride=4), OracleEngine(None, 128), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run_task(Perplexity(docs, window=8, stride=4), engine, out)[2] == 0  # same: resumed
    engine, task = OracleEngine(passkey_answer), Passkey([50], trials=1)
    evaluate([task], engine, out, info={"attention": "dense"})
    with pytest.raises(InputError, match="run.attention 'dense' -> 'dga'"):
        evaluate([task], engine, out, info={"attention": "dga"})


def test_records_without_their_settings_are_refused_not_adopted(tmp_path):
    docs, engine, out = stale_docs(tmp_path), OracleEngine(None, max_length=64), tmp_path / "out"
    run_task(Perplexity(docs, window=8), engine, out)
    (out / "ppl.settings.json").unlink()  # as a run from before settings were kept left it
    with pytest.raises(InputError, match="ppl.jsonl holds records but .*ppl.settings.json is"):
        run_task(Perplexity(docs, window=8), engine, out)
    (out / "ppl.jsonl").write_text("")  # no records: nothing to mix with
    assert run_task(Perplexity(docs, window=32), engine, out)[2] == 1


def write_inputs(directory, seed: int) -> None:
    """A shipped lines case and a document, differing with `seed`."""
    directory.mkdir(parents=True)
    case = lines_case(4, np.random.default_rng(seed))
    (directory / "4_lines.jsonl").write_text(json.dumps(case) + "\n")
    (directory / "a.txt").write_text(f"document {seed} " * 4)


def lines_at(path: str) -> Lines:
    return Lines([4], testcases_dir=path)


def ppl_at(path: str) -> Perplexity:
    return Perplexity(path, window=8)


@pytest.mark.parametrize("make, answer", [(lines_at, lines_answer), (ppl_at, None)])
def test_a_rerun_compares_absolute_paths_not_typed_ones(tmp_path, monkeypatch, make, answer):
    # Paths were stored and compared as typed: `data`, then the same directory as /abs/data,
    # was refused as other settings, and `data` typed in another directory (other inputs)
    # resumed the first run's records.
    engine, out = OracleEngine(answer), tmp_path / "out"
    write_inputs(tmp_path / "a" / "data", 1)
    write_inputs(tmp_path / "b" / "data", 2)
    monkeypatch.chdir(tmp_path / "a")
    assert run_task(make("data"), engine, out)[2] == 1
    assert run_task(make(str(tmp_path / "a" / "data")), engine, out)[2] == 0  # resumed
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(InputError, match=re.escape(f"'{tmp_path}/a/data' -> '{tmp_path}/b/data'")):
        run_task(make("data"), engine, out)


def test_summary_table_and_settings_are_replaced_not_rewritten(tmp_path):
    task = Passkey([50], trials=1)
    evaluate([task], OracleEngine(passkey_answer), tmp_path)
    names = ("summary.json", "results.md", "passkey.settings.json")
    for name in names:  # a reader holding the old file keeps it whole
        (tmp_path / f"{name}.old").hardlink_to(tmp_path / name)
    evaluate([task], OracleEngine(passkey_answer), tmp_path)
    for name in names:
        assert not (tmp_path / name).samefile(tmp_path / f"{name}.old"), name
    old = json.loads((tmp_path / "summary.json.old").read_text())
    assert old["tasks"]["passkey"]["evaluated_now"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["tasks"]["passkey"] == {
        **old["tasks"]["passkey"],
        "evaluated_now": 0,
    }
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Passkey([]), "passkey lengths must hold at least one value"),
        (lambda: Passkey([40, 80, 40]), r"passkey lengths must be distinct, got \[40\]"),
        (lambda: Passkey([40.5]), "passkey lengths must be an integer >= 0, got 40.5"),
        (lambda: Passkey(["40"]), "passkey lengths must be an integer >= 0, got '40'"),
        (lambda: Passkey([-1]), "passkey lengths must be an integer >= 0, got -1"),
        (lambda: Passkey([40], trials=0), "passkey trials must be an integer >= 1, got 0"),
        (lambda: Passkey([40], trials=2.0), "passkey trials must be an integer >= 1, got 2.0"),
        (lambda: Passkey([40], depths=[]), r"passkey depths must be one or more fractions"),
        (lambda: Passkey([40], depths=[0, 0.0]), "passkey depths 0.0 and 0.0 share the id '0'"),
        (
            lambda: Passkey([40], depths=[0.1234561, 0.1234562]),
            "passkey depths 0.1234561 and 0.1234562 share the id '0.123456'",
        ),
        (lambda: Lines([4, 4]), r"lines sizes must be distinct, got \[4\]"),
        (lambda: Lines(["4"]), "lines sizes must be an integer >= 1, got '4'"),
        (lambda: Lines([4], cases=0), "lines cases must be an integer >= 1, got 0"),
        (lambda: Lines([4], seed=-1), "lines seed must be an integer >= 0, got -1"),
        (lambda: Lines([40000]), "generated cases have at most 31313 distinct line ids"),
    ],
)
def test_passkey_and_lines_parameters_are_checked_when_the_task_is_made(make, message):
    # Before: silently no examples (trials 0, depths []), one id for two examples (evaluated
    # twice, one record kept), or a TypeError / numpy error deep inside examples(), after the
    # tasks before it had run.
    with pytest.raises(InputError, match=message):
        make()


def test_numpy_parameters_are_accepted_and_written_as_json(tmp_path):
    # An array of lengths raised "truth value of an array is ambiguous"; NumPy ints in the
    # settings made json.dumps fail before the first example.
    passkey = Passkey(np.array([40, 80]), trials=np.int64(1), depths=[np.float32(0.5)])
    lines = Lines(np.array([3]), cases=np.int64(1), seed=np.int64(2))
    window = Perplexity(str(_one_document(tmp_path)), window=np.int64(4), max_documents=np.int8(1))
    for task, answer in ((passkey, passkey_answer), (lines, lines_answer), (window, None)):
        summary, _, now = run_task(task, OracleEngine(answer, 1500), tmp_path / task.name)
        assert now > 0 and summary.headline is not None
        settings = json.loads((tmp_path / task.name / f"{task.name}.settings.json").read_text())
        assert settings["task"] == json.loads(json.dumps(task.settings()))
    assert passkey.settings() == {"lengths": [40, 80], "trials": 1, "depths": [0.5]}


def _one_document(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("abcdefghij")
    return docs


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(window=4.0), "ppl window must be an integer >= 2, got 4.0"),
        (dict(stride=2.5), "ppl stride must be an integer >= 1, got 2.5"),
        (dict(max_documents=0), "ppl max_documents must be None or an integer >= 1, got 0"),
        (dict(max_documents=-1), "ppl max_documents must be None or an integer >= 1, got -1"),
    ],
)
def test_ppl_sizes_must_be_integers(tmp_path, flags, message):
    # Before: a float stride failed in range() inside examples(), a float window in a slice
    # inside evaluate(); max_documents <= 0 scored no document without a word.
    with pytest.raises(InputError, match=re.escape(message)):
        Perplexity(str(_one_document(tmp_path)), **flags)


def test_ppl_globs_read_only_documents_and_a_path_is_taken_as_it_is(tmp_path):
    docs = _one_document(tmp_path)
    (docs / "README.md").write_text("# PG19\nnot a shard\n")  # was read as a shard: 2 skips
    summary, problems, _ = run_task(
        Perplexity(str(docs / "*"), window=4), OracleEngine(None, 4), tmp_path / "glob"
    )
    assert problems.total() == 0 and summary.metrics["documents"] == 1
    odd = tmp_path / "[test]"  # a glob's character class: the file itself was not found
    odd.mkdir()
    (odd / "book.txt").write_text("abcdefghij")
    assert Perplexity(str(odd / "book.txt")).files == [str(odd / "book.txt")]
    with pytest.raises(MissingInputError, match="holds no documents"):
        Perplexity(str(docs / "README.md"))


def test_the_synthetic_corpus_checks_its_arguments_and_drops_stale_shards(tmp_path, capsys):
    from dga_jax.eval import synthetic

    out = tmp_path / "corpus"
    for kwargs, message in [
        (dict(shards=0), "shards must be an integer >= 1, got 0"),  # wrote nothing, silently
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
        (dict(documents_per_split=(4,)), r"two counts \(train, validation\), got \[4\]"),
        (dict(documents_per_split=(4, -2)), "validation count must be an integer >= 0"),
    ]:
        with pytest.raises(InputError, match=message):
            synthetic.write_retrieval_corpus(out, **kwargs)
    synthetic.write_retrieval_corpus(out, documents_per_split=(4, 2), shards=4)
    synthetic.write_retrieval_corpus(out, documents_per_split=(4, 2), shards=2)
    for split in ("train", "validation"):  # a reader takes every shard: old records mixed in
        names = sorted(p.name for p in (out / split).iterdir())
        assert names == ["retrieval_0.jsonl.zst", "retrieval_1.jsonl.zst"]
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(out), "--documents", "-5"])
    assert "argument --documents: must be at least 0, got -5" in capsys.readouterr().err


def test_a_diverged_models_ppl_is_inf_not_an_overflow(tmp_path):
    # A mean NLL above ~709 nats raised OverflowError at the summary, after every document.
    class Diverged(OracleEngine):
        def score(self, sequences):
            return [TokenScores(s.logprobs * 1e4, s.greedy) for s in super().score(sequences)]

    (tmp_path / "a.txt").write_text("abcdefghij")
    summary, _, _ = run_task(Perplexity(str(tmp_path), stride=2), Diverged(None, 4), tmp_path / "o")
    assert summary.metrics["ppl"] == math.inf
    assert set(summary.metrics["by_position"].values()) == {math.inf}


@pytest.mark.parametrize("convention", ["stride", "longlora"])
def test_a_non_finite_nll_is_written_as_strict_json(tmp_path, convention):
    # A log-probability of -inf reached ppl.jsonl as a bare Infinity, which strict JSON
    # readers (jq, JavaScript, Go) refuse.
    class Broken(OracleEngine):
        def score(self, sequences):
            scores = super().score(sequences)
            logprobs = np.array(scores[0].logprobs)
            logprobs[-1] = -np.inf
            return [TokenScores(logprobs, scores[0].greedy), *scores[1:]]

    (tmp_path / "a.txt").write_text("abcdefghij")
    task = Perplexity(str(tmp_path), stride=2, convention=convention)
    summary, _, _ = run_task(task, Broken(None, 4), tmp_path / "o")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = (tmp_path / "o" / "ppl.jsonl").read_text().splitlines()
    (record,) = [json.loads(line, parse_constant=refuse) for line in lines]
    assert record["nll"] is None and None in record["window_nll"]
    assert math.isnan(summary.metrics["ppl"])  # unknown, not the finite windows' alone


def not_loaded(spec):
    raise AssertionError("the tokenizer and model were loaded before --out was checked")


def test_cli_refuses_an_out_that_is_not_a_directory_before_loading(tmp_path, capsys, monkeypatch):
    # Was "[Errno 17] File exists: ...", naming no flag, after the model had loaded.
    monkeypatch.setattr(cli, "load_tokenizer", not_loaded)
    taken = tmp_path / "taken"
    taken.write_text("")
    base = ["--checkpoint", str(tmp_path), "--tokenizer", "byte", "--out"]
    for out, problem in ((taken, "is a file, not a directory"), (taken / "sub", "Not a directory")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*base, str(out)])
        assert exit_info.value.code == 2
        assert f"error: --out '{out}' " in (err := capsys.readouterr().err) and problem in err


def test_cli_ctrl_c_exits_without_a_traceback_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(spec):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_tokenizer", interrupted)
    flags = ["--checkpoint", str(tmp_path), "--tokenizer", "byte", "--out", str(tmp_path / "o")]
    try:
        cli.main(flags)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main with a traceback")
    except SystemExit as exit_info:
        assert exit_info.code == 130
    err = capsys.readouterr().err
    assert f"interrupted; the records written so far are in {tmp_path / 'o'}" in err


def test_records_written_before_an_interruption_are_kept_and_resumed(tmp_path):
    task, engine = Passkey([50], trials=6), OracleEngine(passkey_answer)
    evaluate_all, calls = task.evaluate, []

    def interrupted_second_chunk(engine, examples):
        calls.append(len(examples))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate_all(engine, examples)

    task.evaluate = interrupted_second_chunk
    with pytest.raises(KeyboardInterrupt):
        run_task(task, engine, tmp_path, chunk=2)
    assert len(read_records(tmp_path / "passkey.jsonl")) == 2
    task.evaluate = evaluate_all
    summary, _, now = run_task(task, engine, tmp_path, chunk=2)
    assert now == 4 and summary.metrics["accuracy"] == 1.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "passkey,nope"], "--tasks 'passkey,nope': each must be one of"),
        (["--tasks", "passkey,ppl"], "--tasks ppl needs --ppl_data"),
        (["--tasks", "longbench_e"], "--tasks longbench_e needs --longbench_dir"),
    ],
)
def test_cli_task_flags_are_checked_before_the_model_loads(
    tmp_path, capsys, monkeypatch, flags, message
):
    # A mistyped task name ended the run after the checkpoint had loaded (minutes for 7B).
    monkeypatch.setattr(cli, "load_tokenizer", not_loaded)
    out = tmp_path / "out"
    base = ["--checkpoint", str(tmp_path), "--tokenizer", "byte", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()  # no empty output folder left behind


def test_a_task_named_twice_runs_once(tmp_path):
    # Twice, its second run reported "evaluated_now": 0 for the examples the first evaluated.
    flags = ["--checkpoint", "c", "--tokenizer", "byte", "--out", "o", "--passkey_lengths", "40"]
    tasks = cli.build_tasks(cli.parse_args([*flags, "--tasks", "passkey,lines,passkey"]), 2000)
    assert [task.name for task in tasks] == ["passkey", "lines"]
