"""LongBench's metrics on crafted cases, each reference quirk pinned by a value it decides."""

from __future__ import annotations

import pytest

from dga_jax.eval import metrics

TREC_LIKE = ["animal", "other", "other animal"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Quick, brown-fox!  an apple", "quick brownfox apple"),
        ("don't stop.", "dont stop"),
        ("the-end", "theend"),  # punctuation goes first, so "the" is no longer a word
        ("banana A theater", "banana theater"),
        ("“curly” quotes", "“curly” quotes"),  # only ASCII punctuation is dropped
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert metrics.normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, truth, expected",
    [
        ("The cat sat", "cat sat on mat", 2 / 3),  # p = 1, r = 1/2
        ("cat cat", "a cat", 2 / 3),  # a bag: the second cat is unmatched
        ("Paris!", "paris", 1.0),
        ("dog", "cat", 0.0),
        ("", "cat", 0.0),
        ("the", "a", 0.0),  # both normalise to nothing
    ],
)
def test_qa_f1_score(prediction, truth, expected):
    assert metrics.qa_f1_score(prediction, truth) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "prediction, truth, expected",
    [
        # rouge 1.0.1 counts distinct words: the reference has 5, so r = 3/5, p = 1.
        ("the cat sat", "the cat sat on the mat", 0.75),
        ("a b", "a b", 1.0),  # 2pr / (p + r + 1e-8)
        ("", "a summary", 0.0),  # "Hypothesis is empty" -> 0.0
        ("...", "a summary", 0.0),  # no sentence left after splitting at dots
        ("a summary", "", 0.0),
        ("x y", "z", 0.0),
    ],
)
def test_rouge_score(prediction, truth, expected):
    assert metrics.rouge_score(prediction, truth) == pytest.approx(expected, abs=1e-7)


def test_classification_score_skips_the_class_after_a_removed_one():
    # "animal" is a substring of the truth and is removed; the loop then skips "other",
    # which stays, so two classes remain: 1/2 (1.0 without the quirk).
    score = metrics.classification_score("other animal", "other animal", all_classes=TREC_LIKE)
    assert score == 0.5


@pytest.mark.parametrize(
    "prediction, truth, expected",
    [
        ("City or Country", "City", 0.5),  # two classes matched, neither inside the truth
        ("It is a City.", "City", 1.0),  # substring match in the prediction
        ("Country", "City", 0.0),
        ("city", "City", 0.0),  # case-sensitive
        ("", "City", 0.0),
    ],
)
def test_classification_score(prediction, truth, expected):
    classes = ["City", "Country", "Mountain"]
    assert metrics.classification_score(prediction, truth, all_classes=classes) == expected


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("There are 12 unique paragraphs, not 13.", 0.5),
        ("12", 1.0),
        ("012", 0.0),  # digit runs are compared as strings
        ("twelve", 0.0),  # no digits at all
        ("1 2", 0.0),
    ],
)
def test_count_score(prediction, expected):
    assert metrics.count_score(prediction, "12") == expected


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Paragraph 3", 1.0),
        ("Paragraph 3 and Paragraph 30", 0.5),
        ("paragraph 3, maybe 4 or 5", 1 / 3),  # every number counts, "Paragraph" or not
        ("The answer is Paragraph", 0.0),
    ],
)
def test_retrieval_score(prediction, expected):
    assert metrics.retrieval_score(prediction, "Paragraph 3") == pytest.approx(expected)


def test_retrieval_score_needs_a_paragraph_in_the_truth():
    with pytest.raises(IndexError):
        metrics.retrieval_score("Paragraph 3", "3")


def test_retrieval_zh_score():
    assert metrics.retrieval_zh_score("段落5，不是段落6", "段落5") == 0.5


def test_qa_f1_zh_score():
    assert metrics.qa_f1_zh_score("北京。", "北京") == 1.0


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("\n\n```python\n# set x\nx = foo(1)\n", 1.0),  # fences and comments are skipped
        ("s = '#'\nx = foo(1)", 1.0),  # any line holding # is skipped, even code
        ("// c\n\nx = foo(1)", 0.0),  # an empty line is the first "code" line
        ("  \nx = foo(1)", 0.33),  # only newlines are stripped: "  " is compared (2 * 2 / 12)
        ("# only\n// comments", 0.0),  # no code line: "" scores 0
        ("x = foo(2)\nx = foo(1)", 0.9),  # fuzz.ratio 90 (an integer percentage)
        ("x = fo", 0.75),  # 2 * 6 / 16 = 75%
    ],
)
def test_code_sim_score(prediction, expected):
    assert metrics.code_sim_score(prediction, "x = foo(1)") == expected


def test_code_sim_score_rounds_to_whole_percent():
    assert metrics.code_sim_score("abc", "abd") == 0.67  # 2 * 2 / 6 = 66.7%


def test_a_missing_library_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'dga-jax\[eval\]'"):
        metrics._library.__wrapped__("no_such_module_for_longbench")


def test_code_sim_score_uses_difflib_as_longbench_did():
    """LongBench installs fuzzywuzzy without python-Levenshtein, so fuzz.ratio is difflib's
    2 * (Ratcliff-Obershelp matches) / length: 25 here, where python-Levenshtein gives the
    LCS-based 50. Installing it would change every lcc / repobench-p score."""
    assert metrics.code_sim_score("cacbbcac", "abaaacca") == 0.25
