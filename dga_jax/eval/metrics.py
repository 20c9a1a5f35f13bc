"""LongBench's metrics (THUDM/LongBench, `LongBench/metrics.py`), behaviour for behaviour.

Every metric scores one prediction against one ground truth, `metric(prediction, ground_truth,
all_classes=...) -> float` in [0, 1]; a record's score is the best over its ground truths
(`dga_jax.eval.longbench_scoring.longbench_score`). The reference's quirks are kept on purpose,
since published numbers were computed with them:

- `qa_f1_score` normalises (lowercase, drop ASCII punctuation, drop the words a/an/the, collapse
  whitespace) and takes the token-bag F1; no common token gives 0.
- `rouge_score` is ROUGE-L F of the `rouge` package 1.0.1 (not Google's `rouge-score`): text
  split into sentences at every ".", all three default metrics computed, and 0.0 when any of
  them raises (an empty prediction, one made only of dots, a sentence too long for its
  recursive LCS).
- `classification_score` counts classes that occur as substrings of the prediction, drops
  those that are substrings of the ground truth, while iterating over the very list it
  removes from (so the class after each removed one is never checked), then gives
  1 / (classes left) if the ground truth is among them.
- `retrieval_score` / `count_score`: the share of all digit runs of the prediction that equal
  the expected number ("Paragraph 3" -> 3 for retrieval); no digits gives 0.
- `code_sim_score`: the first line (after leading newlines) containing none of ` # // is
  compared with `fuzzywuzzy`'s `fuzz.ratio` (an integer percentage) / 100; no such line
  compares "". `fuzz.ratio` uses python-Levenshtein when it is installed and difflib's
  SequenceMatcher otherwise; LongBench's requirements install fuzzywuzzy alone, hence difflib.

The libraries (`rouge`, `fuzzywuzzy`, `jieba` for the Chinese metrics) are the `eval` extra,
imported on first use.
"""

from __future__ import annotations

import collections
import functools
import importlib
import re
import string
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

EXTRA_HINT = "pip install 'dga-jax[eval]'"
PUNCTUATION = frozenset(string.punctuation)
ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼"
    "］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
ZH_EXCLUDE = PUNCTUATION | frozenset(ZH_PUNCTUATION)


@functools.cache
def _library(module: str) -> ModuleType:
    """Imports one of the eval extra's modules, saying how to install it when it is missing."""
    try:
        with warnings.catch_warnings():
            # fuzzywuzzy warns that difflib is slow; difflib is what LongBench's numbers used.
            warnings.filterwarnings("ignore", "Using slow pure-python SequenceMatcher")
            return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"LongBench's metrics need the {package!r} package: {EXTRA_HINT}"
        ) from error


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, then the articles a/an/the, then extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, then every whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in ZH_EXCLUDE)
    return "".join(s.split())


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str], **kwargs: Any) -> float:
    """F1 of two token bags (multisets); 0 when they share no token."""
    common = collections.Counter(prediction) & collections.Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 of the normalised answers (SQuAD style)."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    return f1_score(prediction_tokens, ground_truth_tokens)


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 over jieba words, each normalised, empty ones dropped."""
    return f1_score(_zh_words(prediction), _zh_words(ground_truth))


def _zh_words(text: str) -> list[str]:
    jieba = _library("jieba")
    words = (normalize_zh_answer(word) for word in jieba.cut(text, cut_all=False))
    return [word for word in words if word]


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F of the `rouge` package (1.0.1); 0.0 when it raises."""
    rouge = _library("rouge").Rouge()
    try:
        scores = rouge.get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # LongBench's bare `except`: any failure scores 0
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """`rouge_score` of the texts with their jieba words joined by spaces."""
    jieba = _library("jieba")
    prediction = " ".join(jieba.cut(prediction, cut_all=False))
    ground_truth = " ".join(jieba.cut(ground_truth, cut_all=False))
    return rouge_score(prediction, ground_truth)


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """1 / (matched classes) if the ground truth is matched; needs `all_classes=[...]`."""
    matches = [name for name in kwargs["all_classes"] if name in prediction]
    # LongBench removes from the list it iterates over, so the class after each removed one
    # is skipped (and stays); scores depend on it.
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_share(prediction: str, expected: str) -> float:
    """The share of the digit runs of `prediction` equal to `expected`; 0 without digits."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == str(expected) for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """The share of the prediction's numbers that are the expected count."""
    return _number_share(prediction, ground_truth)


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """The share of the prediction's numbers that are N of the ground truth's "Paragraph N"
    (IndexError when it has none, as in LongBench)."""
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """`retrieval_score` for the Chinese "段落N"."""
    return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """fuzz.ratio / 100 of the first code line (no ` # //) of the prediction and the truth."""
    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if not _is_comment_like(line)), "")
    return _library("fuzzywuzzy.fuzz").ratio(first, ground_truth) / 100


def _is_comment_like(line: str) -> bool:
    """Markdown fences and comments (any line holding ` # or //) are not code to LongBench."""
    return "`" in line or "#" in line or "//" in line
