"""Tokenizers on files the tests make: a trained SentencePiece model and tokenizer.json."""

import json
import re

import pytest

from dga_jax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from dga_jax.errors import InputError
from tests.data.conftest import train_hf_tokenizer

UNICODE = [
    "",
    "plain ascii",
    "héllo wörld, ça va ?",
    "日本語のテキスト 中文 한국어",
    "emoji 🎉 family 👩‍👩‍👧 flag 🇺🇳",
    "combining e\u0301 and zero\u200bwidth",
    "controls \x00\x01\t\r\n and \x7f",
    "\U0010ffff edge of the code space",
]


@pytest.mark.parametrize("text", UNICODE)
def test_byte_tokenizer_round_trips_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(tok.num_special <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials_fit_the_tiny_vocab():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size <= 512
    assert {tok.pad_id, tok.bos_id, tok.eos_id} == {0, 1, 2}
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, 511]) == "hi"
    assert load_tokenizer("byte").vocab_size == tok.vocab_size


def test_sentencepiece_round_trip_and_specials(spm_model):
    tok = load_tokenizer(str(spm_model))
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in ["the quick brown fox jumps", "unseen wörds → byte fallback 🎉"]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def test_hf_tokenizer_round_trip_and_specials(hf_tokenizer_json):
    tok = load_tokenizer(str(hf_tokenizer_json))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in UNICODE:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def test_every_tokenizer_drops_ids_past_its_vocabulary(hf_tokenizer_json, spm_model):
    # A model's vocabulary may be larger than its tokenizer's (the tiny preset: 512 ids over a
    # 360-piece SentencePiece model): a sampled id past the tokenizer's has no text.
    for tok in (
        ByteTokenizer(),
        load_tokenizer(str(spm_model)),
        load_tokenizer(str(hf_tokenizer_json)),
    ):
        ids = tok.encode("the quick brown fox")
        beyond = [tok.vocab_size, tok.vocab_size + 7]
        assert tok.decode([*ids[:2], *beyond, *ids[2:]]) == tok.decode(ids) == "the quick brown fox"


def test_special_token_text_in_a_document_stays_text(hf_tokenizer_json, spm_model):
    text = 'tokens = ["<s>", "hello", "</s>"]  # a document about tokens'
    for tok in (load_tokenizer(str(hf_tokenizer_json)), load_tokenizer(str(spm_model))):
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert "<s>" in tok.decode(ids) and "</s>" in tok.decode(ids)
    hf = load_tokenizer(str(hf_tokenizer_json))
    assert hf.decode(hf.encode(text)) == text


def test_hf_tokenizer_specials_from_config_or_arguments(tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", ["<|pad|>", "<|begin|>", "<|end|>"])
    assert (HFTokenizer(path).bos_id, HFTokenizer(path).eos_id) == (None, None)
    config = {"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert (HFTokenizer(path).bos_id, HFTokenizer(path).eos_id) == (1, 2)
    assert HFTokenizer(path, eos_token="<|pad|>").eos_id == 0
    with pytest.raises(ValueError, match=re.escape("<|nope|>")):
        HFTokenizer(path, bos_token="<|nope|>")


def test_load_tokenizer_from_a_directory(tmp_path, hf_tokenizer_json):
    (tmp_path / "tokenizer.json").write_bytes(hf_tokenizer_json.read_bytes())
    assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer)


def test_load_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(str(tmp_path))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(str(vocab))


def test_every_tokenizer_drops_negative_and_huge_ids(hf_tokenizer_json, spm_model):
    # `dga_jax.stream` yields -1 for a row that has ended; decoding such rows must not raise.
    for tok in (
        ByteTokenizer(),
        load_tokenizer(str(spm_model)),
        load_tokenizer(str(hf_tokenizer_json)),
    ):
        ids = tok.encode("the quick brown fox")
        assert tok.decode([-1, *ids[:2], 2**32, *ids[2:], -1]) == "the quick brown fox"


def test_every_tokenizer_drops_ids_past_int64(hf_tokenizer_json, spm_model):
    # The byte tokenizer read ids as int64: decode([2**64]) raised OverflowError.
    for tok in (
        ByteTokenizer(),
        load_tokenizer(str(spm_model)),
        load_tokenizer(str(hf_tokenizer_json)),
    ):
        ids = tok.encode("the quick brown fox")
        assert tok.decode([2**64, *ids, -(2**64)]) == "the quick brown fox"


def test_every_tokenizer_encodes_lone_surrogates(hf_tokenizer_json, spm_model):
    # JSON can escape a lone surrogate ("\ud83d" of an emoji cut in half), e.g. in eval data.
    text = json.loads('"a broken emoji \\ud83d here"')
    for tok in (load_tokenizer(str(spm_model)), load_tokenizer(str(hf_tokenizer_json))):
        assert tok.decode(tok.encode(text)) == "a broken emoji ? here"


def test_hf_vocab_size_covers_every_id_of_a_vocabulary_with_holes(tmp_path, hf_tokenizer_json):
    # A tokenizer.json's ids need not be contiguous: the model must fit the largest of them,
    # and decoding must keep it.
    data = json.loads(hf_tokenizer_json.read_text())
    vocab = data["model"]["vocab"]
    piece = max(vocab, key=vocab.get)
    vocab[piece] = 1000
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    tok = load_tokenizer(str(path))
    ids = tok.encode(f"{piece} {piece}")
    assert 1000 in ids
    assert tok.vocab_size == 1001
    assert tok.decode(ids) == f"{piece} {piece}"


@pytest.mark.parametrize(
    ("config", "problem"),
    [("{not json", "cannot be read"), ("[1, 2]", "must hold a JSON object, got list")],
)
def test_a_bad_tokenizer_config_is_named_not_the_tokenizer_json(
    tmp_path, hf_tokenizer_json, config, problem
):
    (tmp_path / "tokenizer.json").write_bytes(hf_tokenizer_json.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(config)
    expected = f"tokenizer config {str(tmp_path / 'tokenizer_config.json')!r} {problem}"
    with pytest.raises(InputError, match=re.escape(expected)):
        load_tokenizer(str(tmp_path))


def test_a_tiktoken_tokenizer_model_is_named(tmp_path):
    # LLaMA 3's original/tokenizer.model is tiktoken's rank list, not SentencePiece: the
    # error was SentencePiece's parse failure alone.
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(InputError, match=r"a tiktoken file, as LLaMA 3's: pass its tokenizer.json"):
        load_tokenizer(str(path))
    path.write_bytes(b"\n\x0fnot a model at all")
    with pytest.raises(InputError, match=r"tokenizer.model' cannot be read: "):
        load_tokenizer(str(path))


def test_metas_original_tiktoken_model_names_the_checkpoints_tokenizer_json(tmp_path):
    # Meta's LLaMA 3 checkpoints hold original/tokenizer.model and tokenizer.json above it.
    (tmp_path / "original").mkdir()
    path = tmp_path / "original" / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nIg== 1\n")
    train_hf_tokenizer(tmp_path / "tokenizer.json", ["<s>", "</s>"])
    message = f"pass its tokenizer.json, {str(tmp_path / 'tokenizer.json')!r}"
    with pytest.raises(InputError, match=re.escape(message)):
        load_tokenizer(str(path))


def test_a_directory_with_a_tiktoken_model_uses_its_tokenizer_json(tmp_path):
    # Meta's LLaMA 3 folders hold both: the tiktoken file was picked, and refused.
    (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")
    train_hf_tokenizer(tmp_path / "tokenizer.json", ["<s>", "</s>"])
    assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer)
