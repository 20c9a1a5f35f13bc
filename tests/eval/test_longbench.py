"""LongBench-E: prompts, middle truncation, scoring, bucketing and the pred_e files, on data the
tests write, with a byte-tokenizer engine that replies with canned completions."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from dga_jax.data.tokenizers import ByteTokenizer
from dga_jax.errors import InputError, MissingInputError
from dga_jax.eval import metrics
from dga_jax.eval.longbench import LongBenchE, longbench_max_input, middle_truncate
from dga_jax.eval.longbench_scoring import length_bucket, write_predictions
from dga_jax.eval.runner import read_records, run_task
from dga_jax.eval.task import Example, Problems
from tests.eval.conftest import PromptCounter

BOS = ByteTokenizer().bos_id


class FakeEngine:
    """Byte tokens; each prompt is answered by the reply whose key it contains ("" if none).
    `calls` records each generate call: (prompts, max_new_tokens, stop_tokens, min_new_tokens)."""

    def __init__(self, max_length: int = 4096, replies: dict[str, str] | None = None):
        self.tokenizer = ByteTokenizer()
        self.max_length = max_length
        self.replies = replies or {}
        self.calls: list[tuple[int, int, list[int], int]] = []

    def generate(self, prompts, max_new_tokens, stop_tokens=(), min_new_tokens=0):
        self.calls.append((len(prompts), max_new_tokens, list(stop_tokens), min_new_tokens))
        texts = [self.tokenizer.decode(prompt) for prompt in prompts]
        return [self.tokenizer.encode(self._reply(text))[:max_new_tokens] for text in texts]

    def _reply(self, prompt: str) -> str:
        return next((reply for key, reply in self.replies.items() if key in prompt), "")


def record(**fields) -> str:
    """One JSON line of a `{name}_e.jsonl` file, LongBench's fields defaulted."""
    line = {"input": "", "context": "", "answers": [], "length": 100, "all_classes": None}
    return json.dumps({**line, **fields}, ensure_ascii=False)


def write_data(directory: Path, files: dict[str, list[str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for dataset, lines in files.items():
        text = "".join(line + "\n" for line in lines)
        (directory / f"{dataset}_e.jsonl").write_text(text, encoding="utf-8")
    return directory


def examples_of(task: LongBenchE, engine: FakeEngine) -> tuple[list[Example], Problems]:
    problems = Problems()
    return list(task.examples(engine, problems)), problems


def test_prompt_hotpotqa(tmp_path):
    line = record(
        input="Who wrote Emma?",
        context="Passage 1:\nEmma is a novel by Jane Austen.",
        answers=["Jane Austen"],
        length=9,
        _id="abc",
    )
    task = LongBenchE(write_data(tmp_path, {"hotpotqa": [line]}), ["hotpotqa"])
    [example], _ = examples_of(task, FakeEngine())
    expected = (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\nThe following are given passages.\nPassage 1:\nEmma is a "
        "novel by Jane Austen.\n\nAnswer the question based on the given passages. Only give me "
        "the answer and do not output any other words.\n\nQuestion: Who wrote Emma?\nAnswer:"
    )
    assert example.prompt == [BOS, *ByteTokenizer().encode(expected)]
    assert example.id == "hotpotqa/0"
    assert example.max_new_tokens == 32
    assert example.fields == {
        "dataset": "hotpotqa",
        "answers": ["Jane Austen"],
        "all_classes": None,
        "length": 9,
    }


def test_prompt_repobench_keeps_braces_of_the_record(tmp_path):
    line = record(context="# a.py\nd = {}\n", input="import a\nx = {input}", answers=["y"])
    task = LongBenchE(write_data(tmp_path, {"repobench-p": [line]}), ["repobench-p"])
    [example], _ = examples_of(task, FakeEngine())
    expected = (
        "Please complete the code given below. \n# a.py\nd = {}\nimport a\nx = {input}"
        "Next line of code:\n"
    )
    assert ByteTokenizer().decode(example.prompt) == expected
    assert example.max_new_tokens == 64


def test_middle_truncation_keeps_both_ends(tmp_path):
    line = record(context="HEAD" + "x" * 200 + "TAIL", answers=["y"])
    task = LongBenchE(write_data(tmp_path, {"lcc": [line]}), ["lcc"], max_input=60)
    [example], _ = examples_of(task, FakeEngine(max_length=200))
    # BOS + 29 bytes of the head, and the last 30 bytes: 60 tokens.
    assert len(example.prompt) == 60
    assert example.prompt[0] == BOS
    head, tail = "Please complete the code give", "xxxxxxxTAILNext line of code:\n"
    assert ByteTokenizer().decode(example.prompt) == head + tail


def test_middle_truncate_counts_bos():
    # "a" is id 100. BOS + 3 bytes fit 4; BOS + 4 do not: halves [BOS, a] and [c, d].
    assert middle_truncate(ByteTokenizer(), "abc", 4) == [BOS, 100, 101, 102]
    assert middle_truncate(ByteTokenizer(), "abcd", 4) == [BOS, 100, 102, 103]


def test_a_prompt_that_grows_at_the_seam_is_skipped(tmp_path):
    # The default limit for a 200-token window is 200 - 64 = 136. Both halves end inside a
    # 2-byte character, each decoded as U+FFFD (3 bytes): 140 tokens, no room for 64 more.
    lines = [record(context="x" + "é" * 200, answers=["y"]), record(context="ok", answers=["y"])]
    task = LongBenchE(write_data(tmp_path, {"lcc": lines}), ["lcc"])
    examples, problems = examples_of(task, FakeEngine(max_length=200))
    assert [e.id for e in examples] == ["lcc/1"]
    assert problems.report() == {
        "prompt does not fit after middle truncation": {"count": 1, "first": ["lcc_e.jsonl:1"]}
    }


@pytest.mark.parametrize(
    "max_length, max_new_tokens, expected",
    [(4096, 128, 3500), (8192, 512, 7500), (16384, 64, 15500), (32768, 32, 31500)]
    + [(1024, 512, 500), (2048, 32, 1500), (512, 64, 448)],
)
def test_longbench_max_input(max_length, max_new_tokens, expected):
    assert longbench_max_input(max_length, max_new_tokens) == expected


def test_default_max_input_follows_the_window(tmp_path):
    task = LongBenchE(write_data(tmp_path, {"lcc": [record(context="x" * 5000)]}), ["lcc"])
    [example], _ = examples_of(task, FakeEngine(max_length=4096))
    assert len(example.prompt) == 3500


def test_a_max_input_without_room_for_the_answer_is_an_error(tmp_path):
    task = LongBenchE(write_data(tmp_path, {"gov_report": []}), ["gov_report"], max_input=4000)
    with pytest.raises(InputError, match="max_input 4000 and gov_report's 512 new tokens"):
        examples_of(task, FakeEngine(max_length=4096))


def test_missing_data_dir_names_it(tmp_path):
    task = LongBenchE(tmp_path / "nowhere", ["qasper"])
    with pytest.raises(MissingInputError, match="nowhere") as error:
        examples_of(task, FakeEngine())
    assert "{name}_e.jsonl files of LongBench's data.zip" in str(error.value)


def test_missing_file_names_its_path(tmp_path):
    task = LongBenchE(write_data(tmp_path, {"qasper": []}), ["qasper", "lcc"])
    with pytest.raises(MissingInputError) as error:
        examples_of(task, FakeEngine())
    assert str(tmp_path / "lcc_e.jsonl") in str(error.value)
    assert "qasper_e.jsonl" not in str(error.value)
    assert "data.zip" in str(error.value)


def test_unknown_dataset_is_an_error(tmp_path):
    with pytest.raises(InputError, match="qasper_zh"):
        LongBenchE(tmp_path, ["qasper", "qasper_zh"])


def test_an_empty_dataset_list_is_an_error_not_all_13(tmp_path):
    with pytest.raises(InputError, match="datasets is empty: name at least one, or None"):
        LongBenchE(tmp_path, [])
    assert len(LongBenchE(tmp_path).datasets) == 13


def test_a_dataset_named_twice_or_as_a_string_runs_once(tmp_path):
    data = write_data(tmp_path, {"qasper": [record(input="q", answers=["a"])]})
    for datasets in (["qasper", "qasper"], "qasper"):
        task = LongBenchE(data, datasets)
        examples, _ = examples_of(task, FakeEngine())
        assert (task.datasets, [e.id for e in examples]) == (("qasper",), ["qasper/0"])


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_model_name_must_be_one_directory_below_pred_e(tmp_path, name):
    with pytest.raises(InputError, match="must be one path component"):
        LongBenchE(tmp_path, ["qasper"], model_name=name)


def test_a_file_saved_with_a_byte_order_mark_keeps_its_first_record(tmp_path):
    data = write_data(tmp_path, {"qasper": [record(input="q", answers=["a"])] * 2})
    path = data / "qasper_e.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    examples, problems = examples_of(LongBenchE(data, ["qasper"]), FakeEngine())
    assert ([e.id for e in examples], problems.total()) == (["qasper/0", "qasper/1"], 0)


def test_malformed_lines_are_counted_not_fatal(tmp_path):
    good = record(input="q", context="c", answers=["a"])
    qasper = [
        good,
        "{not json",
        json.dumps({"input": "q", "context": "c", "length": 1, "all_classes": None}),
        record(answers="a"),
        "",
        "[1, 2]",
        record(answers=["a"], length="long"),
        good,
        record(input=5, answers=["a"]),
    ]
    data = write_data(tmp_path, {"qasper": qasper})
    with (data / "qasper_e.jsonl").open("ab") as f:
        f.write(b'{"input": "\xff"}\n')
    write_data(data, {"trec": [record(answers=["City"])]})
    write_data(data, {"passage_retrieval_en": [record(answers=["4"])]})
    task = LongBenchE(data, ["qasper", "trec", "passage_retrieval_en"])
    examples, problems = examples_of(task, FakeEngine())
    assert [e.id for e in examples] == ["qasper/0", "qasper/7"]
    assert problems.report() == {
        "answer without 'Paragraph N'": {"count": 1, "first": ["passage_retrieval_en_e.jsonl:1"]},
        "field 'all_classes' is not a list of strings": {"count": 1, "first": ["trec_e.jsonl:1"]},
        "field 'answers' is not a list of strings": {"count": 1, "first": ["qasper_e.jsonl:4"]},
        "field 'input' is not a string": {"count": 1, "first": ["qasper_e.jsonl:9"]},
        "field 'length' is not a number": {"count": 1, "first": ["qasper_e.jsonl:7"]},
        "malformed JSON": {"count": 2, "first": ["qasper_e.jsonl:2", "qasper_e.jsonl:10"]},
        "missing field 'answers'": {"count": 1, "first": ["qasper_e.jsonl:3"]},
        "not a JSON object": {"count": 1, "first": ["qasper_e.jsonl:6"]},
    }


def test_samsum_alone_stops_at_its_first_newline_never_at_its_first_token(tmp_path):
    data = write_data(
        tmp_path,
        {
            "qasper": [record(input="q", answers=["a"])],
            "samsum": [record(input="Dialogue: A: hi", answers=["A greets."])] * 2,
            "trec": [record(input="Where?", answers=["City"], all_classes=["City"])],
        },
    )
    task = LongBenchE(data, ["qasper", "samsum", "trec"])
    engine = FakeEngine()
    examples, _ = examples_of(task, engine)
    assert [(e.stop, e.min_new_tokens) for e in examples] == [
        ((), 0),
        (("\n",), 1),
        (("\n",), 1),
        ((), 0),
    ]
    task.evaluate(engine, examples)
    newline = ByteTokenizer().encode("\n")[-1]
    # qasper and samsum share their 128 new tokens, not their stopping rule: two calls.
    assert engine.calls == [(1, 128, [], 0), (2, 128, [newline], 1), (1, 64, [], 0)]


def test_a_rerun_tokenizes_only_the_pending_prompts(tmp_path):
    qasper = [record(context=f"CTX {i}", input="q", answers=["a"]) for i in range(3)]
    samsum = [record(context=f"CTX {i}", input="d", answers=["s"]) for i in range(2)]
    data = write_data(tmp_path / "data", {"qasper": [*qasper, "{not json"], "samsum": samsum})
    task = LongBenchE(data, ["qasper", "samsum"])
    engine = FakeEngine()
    engine.tokenizer = PromptCounter("CTX")
    out = tmp_path / "out"
    _, problems, now = run_task(task, engine, out)
    ids = set(read_records(out / "longbench_e.jsonl"))
    assert (now, engine.tokenizer.prompts, len(ids), problems.total()) == (5, 5, 5, 1)
    _, problems, now = run_task(task, engine, out)  # all done: nothing tokenized
    assert (now, engine.tokenizer.prompts, problems.total()) == (0, 5, 1)
    path = out / "longbench_e.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    _, problems, now = run_task(task, engine, out)  # 2 done: the other 3 tokenized
    assert (now, engine.tokenizer.prompts, problems.total()) == (3, 8, 1)
    assert set(read_records(path)) == ids


@pytest.mark.parametrize(
    "dataset, expected", [("triviaqa", 1.0), ("samsum", 1.0), ("qasper", 2 / 3)]
)
def test_score_first_line_rule(dataset, expected):
    example = Example(
        "x/0", [BOS], 8, {"dataset": dataset, "answers": ["Paris"], "all_classes": None}
    )
    fields = LongBenchE("data").score(example, [], "\nParis\nLondon")
    assert fields["pred"] == "\nParis\nLondon"
    assert fields["score"] == pytest.approx(expected, abs=1e-7)


def test_score_is_the_best_answer_and_passes_all_classes():
    classes = ["Abbreviation", "City", "Country"]
    fields = {"dataset": "trec", "answers": ["Country", "City"], "all_classes": classes}
    example = Example("trec/0", [BOS], 64, fields)
    assert LongBenchE("data").score(example, [], "City\nCountry")["score"] == 1.0


@pytest.mark.parametrize(
    "length, bucket", [(0, "0-4k"), (3999, "0-4k"), (4000, "4-8k"), (7999, "4-8k"), (8000, "8k+")]
)
def test_length_bucket(length, bucket):
    assert length_bucket(length) == bucket


def crafted_records() -> list[dict]:
    qasper = [(100, 1.0), (3999, 0.5), (4000, 0.25), (7999, 0.0), (8000, 1.0), (20000, 0.25)]
    records = [
        {"id": f"qasper/{i}", "dataset": "qasper", "length": n, "score": s, "pred": f"p{i}"}
        for i, (n, s) in reversed(list(enumerate(qasper)))
    ]
    records.append({"id": "hotpotqa/3", "dataset": "hotpotqa", "length": 10, "score": 0.25})
    records.append({"id": "lcc/0", "dataset": "lcc", "length": 10, "score": 1.0})
    for row in records:
        row.update(pred=row.get("pred", "p"), answers=["a"], all_classes=None)
    return records


def test_summarize_buckets_and_averages(tmp_path):
    task = LongBenchE("data", ["qasper", "hotpotqa", "trec"], model_name="m")
    summary = task.summarize(crafted_records(), tmp_path)
    nothing = {"0-4k": None, "4-8k": None, "8k+": None, "all": None}
    assert summary.metrics == {
        "datasets": {
            "qasper": {"0-4k": 75.0, "4-8k": 12.5, "8k+": 62.5, "all": 50.0},
            "hotpotqa": {"0-4k": 25.0, "4-8k": None, "8k+": None, "all": 25.0},
            "trec": nothing,
        },
        "average": {"0-4k": 50.0, "4-8k": 12.5, "8k+": 62.5, "all": 37.5},
        "records": {"qasper": 6, "hotpotqa": 1, "trec": 0},
    }
    assert summary.table == (
        "| dataset | 0-4k | 4-8k | 8k+ | all |\n"
        "|---|---:|---:|---:|---:|\n"
        "| qasper | 75.00 | 12.50 | 62.50 | 50.00 |\n"
        "| hotpotqa | 25.00 | - | - | 25.00 |\n"
        "| trec | - | - | - | - |\n"
        "| average | 50.00 | 12.50 | 62.50 | 37.50 |\n"
    )
    directory = tmp_path / "pred_e" / "m"
    assert summary.files == [str(directory / "qasper.jsonl"), str(directory / "hotpotqa.jsonl")]
    lines = (directory / "qasper.jsonl").read_text().splitlines()
    assert [json.loads(line)["pred"] for line in lines] == [f"p{i}" for i in range(6)]


def test_summarize_rounds_buckets_as_numpy_does(tmp_path):
    # eval.py rounds np.float64: 0.005 -> 0.0 (round half to even of 0.5); Python's round of
    # the float gives 0.01, which is what the "all" column (eval.py without --e) reports.
    rows = [{"id": "qasper/0", "dataset": "qasper", "length": 1, "score": 5e-05, "pred": "p"}]
    rows[0].update(answers=["a"], all_classes=None)
    summary = LongBenchE("data", ["qasper"]).summarize(rows, tmp_path)
    assert summary.metrics["datasets"]["qasper"]["0-4k"] == 0.0
    assert summary.metrics["datasets"]["qasper"]["all"] == 0.01


# An independent copy of eval.py's dataset2metric for the rescoring below.
EVAL_PY_METRICS = {
    "trec": metrics.classification_score,
    "triviaqa": metrics.qa_f1_score,
    "qasper": metrics.qa_f1_score,
    "passage_retrieval_en": metrics.retrieval_score,
    "lcc": metrics.code_sim_score,
}


def rescore_like_eval_py(directory: Path) -> dict[str, dict[str, float]]:
    """eval.py --e's loop over pred_e/<model>/*.jsonl (all_classes from a file's last line)."""
    scores = {}
    for filename in os.listdir(directory):
        if not filename.endswith("jsonl"):
            continue
        dataset = filename.split(".")[0]
        predictions, answers, lengths = [], [], []
        with open(directory / filename, encoding="utf-8") as f:
            for line in f:
                data = json.loads(line)
                predictions.append(data["pred"])
                answers.append(data["answers"])
                all_classes = data["all_classes"]
                lengths.append(data["length"])
        buckets = {"0-4k": [], "4-8k": [], "8k+": []}
        for prediction, truths, length in zip(predictions, answers, lengths, strict=True):
            if dataset in ["trec", "triviaqa", "samsum", "lsht"]:
                prediction = prediction.lstrip("\n").split("\n")[0]
            score = 0.0
            for truth in truths:
                metric = EVAL_PY_METRICS[dataset]
                score = max(score, metric(prediction, truth, all_classes=all_classes))
            key = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
            buckets[key].append(score)
        with np.errstate(invalid="ignore"):
            scores[dataset] = {
                k: round(100 * np.mean(v), 2) if v else math.nan for k, v in buckets.items()
            }
    return scores


END_TO_END = {
    "trec": [
        ("Where is Rome?", ["City"], 3000, "\nCity\nQuestion: Who?"),
        ("What is NATO?", ["Abbreviation"], 5000, "Country"),
    ],
    "triviaqa": [
        ("Capital of France?", ["Paris", "paris france"], 9000, "Paris\nQuestion: x"),
        ("Highest Alp?", ["Mont Blanc"], 100, "the Mont Blanc massif"),
    ],
    "qasper": [("Which drink?", ["café au lait"], 12000, "Café au lait.")],
    "passage_retrieval_en": [
        ("abstract A", ["Paragraph 4"], 7000, "Paragraph 4"),
        ("abstract B", ["Paragraph 4"], 7999, "Paragraph 4 or Paragraph 5"),
    ],
}
END_TO_END_SCORES = [1.0, 0.0, 1.0, 0.8, 1.0, 1.0, 0.5]
TREC_CLASSES = ["Abbreviation", "City", "Country", "Other location"]


def end_to_end_data(directory: Path) -> tuple[Path, dict[str, str]]:
    files, replies = {}, {}
    for dataset, rows in END_TO_END.items():
        classes = TREC_CLASSES if dataset == "trec" else None
        files[dataset] = [
            record(input=q, context="ctx", answers=a, length=n, all_classes=classes)
            for q, a, n, _ in rows
        ]
        replies.update({q: reply for q, _, _, reply in rows})
    files["lcc"] = [record(context="def f(x):\n", answers=["return x + 1"], length=4000)]
    replies["def f(x):"] = "\n# done\nreturn x + 1\n"
    return write_data(directory, files), replies


def test_pred_e_files_rescore_to_the_summary(tmp_path):
    data, replies = end_to_end_data(tmp_path / "data")
    task = LongBenchE(data, [*END_TO_END, "lcc"], model_name="tiny-dga")
    engine = FakeEngine(max_length=1024, replies=replies)
    examples, problems = examples_of(task, engine)
    records = task.evaluate(engine, examples)
    assert problems.total() == 0
    assert [r["score"] for r in records] == pytest.approx(END_TO_END_SCORES + [1.0], abs=1e-7)

    summary = task.summarize(records, tmp_path / "out")
    directory = tmp_path / "out" / "pred_e" / "tiny-dga"
    assert (directory / "lcc.jsonl").read_text(encoding="utf-8") == (
        '{"pred": "\\n# done\\nreturn x + 1\\n", "answers": ["return x + 1"], '
        '"all_classes": null, "length": 4000}\n'
    )
    assert '"answers": ["café au lait"]' in (directory / "qasper.jsonl").read_text("utf-8")
    expected = rescore_like_eval_py(directory)
    assert set(expected) == set(summary.metrics["datasets"])
    for dataset, buckets in expected.items():
        ours = summary.metrics["datasets"][dataset]
        for bucket, value in buckets.items():
            assert ours[bucket] == value or (ours[bucket] is None and math.isnan(value))
    assert summary.metrics["datasets"]["trec"] == {
        "0-4k": 100.0,
        "4-8k": 0.0,
        "8k+": None,
        "all": 50.0,
    }


def test_pred_e_files_are_replaced_whole(tmp_path):
    rows = [{"pred": "é", "answers": ["a"], "all_classes": None, "length": 10}]
    path = write_predictions(tmp_path, "qasper", rows)
    old = tmp_path / "old.jsonl"
    old.hardlink_to(path)  # a reader holding the old file keeps it whole
    write_predictions(tmp_path, "qasper", rows * 2)
    assert (
        old.read_text("utf-8")
        == '{"pred": "é", "answers": ["a"], "all_classes": null, "length": 10}\n'
    )
    assert len(path.read_text("utf-8").splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.jsonl", "qasper.jsonl"]


@pytest.mark.parametrize("field", ["answers", "all_classes"])
def test_a_record_with_a_lone_surrogate_is_counted_not_fatal(tmp_path, field):
    # Valid JSON ("\ud800" escaped) that UTF-8 cannot write: writing its record raised
    # UnicodeEncodeError and ended the run. (In a prompt the tokenizers replace it.)
    fields = {"input": "q\ud800", "context": "c", "answers": ["a"], "length": 5}
    fields = {**fields, "all_classes": None, field: ["b", "x\ud800"]}
    good = record(input="q", context="c", answers=["a"])
    data = write_data(tmp_path / "data", {"qasper": [good, json.dumps(fields), good]})
    summary, problems, now = run_task(LongBenchE(data, ["qasper"]), FakeEngine(), tmp_path / "o")
    assert (now, summary.metrics["records"]) == (2, {"qasper": 2})
    assert problems.report() == {
        f"field {field!r} is not UTF-8 text (a lone surrogate)": {
            "count": 1,
            "first": ["qasper_e.jsonl:2"],
        }
    }


def test_a_rerun_compares_the_absolute_data_dir_not_the_typed_one(tmp_path, monkeypatch):
    # data_dir was stored and compared as typed: `data`, then the same directory as /abs/data,
    # was refused as other settings, and `data` typed in another directory resumed.
    for where in ("a", "b"):
        write_data(tmp_path / where / "data", {"qasper": [record(input=where, answers=["x"])]})
    engine, out = FakeEngine(), tmp_path / "out"
    monkeypatch.chdir(tmp_path / "a")
    assert run_task(LongBenchE("data", ["qasper"]), engine, out)[2] == 1
    assert run_task(LongBenchE(tmp_path / "a" / "data", ["qasper"]), engine, out)[2] == 0
    monkeypatch.chdir(tmp_path / "b")
    moved = re.escape(f"'{tmp_path}/a/data' -> '{tmp_path}/b/data'")
    with pytest.raises(InputError, match=moved):
        run_task(LongBenchE("data", ["qasper"]), engine, out)
