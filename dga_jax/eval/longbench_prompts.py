"""LongBench's configuration for its English LongBench-E datasets, and its prompt limits.

The dataset names, the prompt templates (`config/dataset2prompt.json`), the answer lengths
(`config/dataset2maxlen.json`) and samsum's stopping rule of `LongBench/pred.py`, with the
prompt limit of `config/model2maxlen.json` for a window and pred.py's middle truncation to it.
"""

from __future__ import annotations

from dga_jax.data.tokenizers import Tokenizer
from dga_jax.eval.engine import with_bos

DATASETS = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)

_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output "
    "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question "
    "based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question "
    'cannot be answered based on the information in the article, write "unanswerable". If the '
    'question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any '
    "explanation."
)
# LongBench's config/dataset2prompt.json, character for character.
PROMPTS = {
    "qasper": (
        f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}"
        f"\n\nArticle: {{context}}\n\n Answer the question based on the above article "
        f"{_QASPER_RULES}\n\nQuestion: {{input}}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": _QA_PASSAGES,
    "2wikimqa": _QA_PASSAGES,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report."
        "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions."
        "\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
        "removing duplicates. The output format should only contain the number, such as 1, 2, 3, "
        "and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
        "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The "
        'answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: '
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
# LongBench's config/dataset2maxlen.json: the most new tokens per answer.
MAX_NEW_TOKENS = {
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "gov_report": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}
# pred.py's samsum rule: generation also ends at the newline token (`encode("\n")[-1]`), and its
# min_length of prompt + 1 rules that newline and EOS out as the first new token.
STOPS = {"samsum": (("\n",), 1)}


def longbench_max_input(max_length: int, max_new_tokens: int) -> int:
    """LongBench's prompt limit (model2maxlen.json) for a window of `max_length` tokens.

    LongBench gives 3500 tokens to 4K models, 7500 to 8K, 15500 to 16K and 31500 to 32K: the
    window in units of 1024 tokens, times 1000, minus 500. It is capped at max_length -
    max_new_tokens so the answer fits (never binding from 1K windows up), and is that cap alone
    for windows under 1024 tokens.
    """
    rule = 1000 * (max_length // 1024) - 500
    room = max_length - max_new_tokens
    return min(rule, room) if rule > 0 else room


def middle_truncate(tokenizer: Tokenizer, prompt: str, max_input: int) -> list[int]:
    """Token ids (BOS included) of `prompt`, cut in the middle as pred.py does when they are
    more than `max_input`.

    pred.py tokenizes with BOS, keeps the first and last max_input // 2 ids, decodes each half
    with special tokens skipped (dropping the BOS), joins the two texts and tokenizes again, so
    the result can differ from max_input by the tokens that change at the seam.
    """
    ids = with_bos(tokenizer, prompt)
    if len(ids) <= max_input:
        return ids
    half = max_input // 2
    return with_bos(tokenizer, tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:]))
