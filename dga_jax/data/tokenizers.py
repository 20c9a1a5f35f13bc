"""Tokenizers behind one small protocol: built-in bytes, SentencePiece, Hugging Face `tokenizers`.

`load_tokenizer("byte")` gives the built-in byte-level tokenizer (259 ids, fits the `tiny`
preset's vocabulary of 512); any other spec is a path to a SentencePiece `*.model`, a Hugging
Face `tokenizer.json`, or a directory holding one of them. Ids never include BOS/EOS: packing
adds those (see `dga_jax.data.packing`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece
import tokenizers

from dga_jax.errors import InputError, MissingInputError

BYTE_SPEC = "byte"
# Tried in order when a tokenizer.json comes without a tokenizer_config.json naming its specials.
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `bos_id` / `eos_id` are None when the vocabulary has no such token."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens and ids outside the vocabulary (a model's may be
        larger) are dropped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..2 are PAD, BOS, EOS and id 3 + b is byte b.

    `decode(encode(s)) == s` for every string that UTF-8 can encode; lone surrogates (which
    JSON can carry) are written as their surrogate-escaped bytes instead of failing.
    """

    pad_id = 0
    num_special = 3

    @property
    def vocab_size(self) -> int:
        return self.num_special + 256

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def encode(self, text: str) -> list[int]:
        """Ids of the UTF-8 bytes of `text`."""
        data = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
        return (data.astype(np.int32) + self.num_special).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in `ids` (other ids dropped, invalid UTF-8 replaced); compared
        as Python ints, as the other tokenizers do: an id past int64 (2**64) is dropped too."""
        first, end = self.num_special, self.vocab_size
        data = bytes(int(i) - first for i in ids if first <= int(i) < end)
        return data.decode("utf-8", "replace")


class SentencePieceTokenizer:
    """A SentencePiece model file, e.g. LLaMA-2's `tokenizer.model` (BOS 1, EOS 2)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`, without BOS/EOS; lone surrogates are encoded as "?"."""
        return self._sp.encode(encodable(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control pieces (BOS/EOS/PAD) and ids outside the vocabulary decode to
        nothing (SentencePiece itself raises on those)."""
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` library.

    BOS/EOS come from `bos_token` / `eos_token` if given, else from a `tokenizer_config.json`
    beside the file, else from the first of `BOS_CANDIDATES` / `EOS_CANDIDATES` in the vocabulary.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self.path = os.fspath(path)
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        # Special-token text in a document ("</s>" in code) stays text, as with SentencePiece:
        # a real BOS/EOS id there would be a false document boundary.
        self._tok.encode_special_tokens = True
        specials = _special_tokens_from_config(os.path.dirname(self.path))
        self._bos_id = self._find_id(bos_token or specials.get("bos_token"), BOS_CANDIDATES)
        self._eos_id = self._find_id(eos_token or specials.get("eos_token"), EOS_CANDIDATES)
        # Not `get_vocab_size()`, a count: a file's ids may have holes, and an id past the count
        # must still fit the model's vocabulary and decode.
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def _find_id(self, token: str | None, candidates: Sequence[str]) -> int | None:
        for name in (token,) if token else candidates:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if token:
            raise ValueError(f"{self.path}: special token {token!r} is not in the vocabulary")
        return None

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, never a special token's: the file's post-processor (which may
        add BOS) is not applied, and special-token text in `text` is encoded as text. Lone
        surrogates are encoded as "?"."""
        return self._tok.encode(encodable(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens and ids outside the vocabulary (-1 too) skipped."""
        size = self.vocab_size
        return self._tok.decode(
            [int(i) for i in ids if 0 <= int(i) < size], skip_special_tokens=True
        )


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """`"byte"` -> ByteTokenizer; a `*.model` path -> SentencePiece; a `*.json` path -> HF.

    A directory is searched for `tokenizer.model`, then `tokenizer.json`.
    """
    if spec == BYTE_SPEC:
        return ByteTokenizer()
    path = os.fspath(spec)
    if os.path.isdir(path):
        found = [
            os.path.join(path, name)
            for name in ("tokenizer.model", "tokenizer.json")
            if os.path.isfile(os.path.join(path, name))
        ]
        if not found:
            raise MissingInputError(f"no tokenizer.model or tokenizer.json in directory {path!r}")
        if len(found) > 1 and _is_tiktoken(found[0]):  # LLaMA 3's: its tokenizer.json serves
            found = found[1:]
        path = found[0]
    if not os.path.isfile(path):
        raise MissingInputError(f"tokenizer file {path!r} does not exist (spec {spec!r})")
    kinds = {".model": SentencePieceTokenizer, ".json": HFTokenizer}
    for suffix, kind in kinds.items():
        if path.endswith(suffix):
            try:
                return kind(path)
            except InputError:  # names its own file (a tokenizer_config.json)
                raise
            except Exception as error:  # SentencePiece and tokenizers raise bare errors
                hint = _tiktoken_hint(path) if suffix == ".model" and _is_tiktoken(path) else ""
                message = f"tokenizer file {path!r} cannot be read{hint}: {error}"
                raise InputError(message) from error
    raise InputError(
        f"unknown tokenizer file {path!r}: expected 'byte', a SentencePiece *.model "
        "or a Hugging Face tokenizer.json"
    )


def encodable(text: str) -> str:
    """`text` with its lone surrogates (JSON can escape them), which UTF-8 cannot encode and
    SentencePiece / `tokenizers` refuse, replaced by "?"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _optional_id(token_id: int) -> int | None:
    """SentencePiece marks a disabled special token with -1."""
    return None if token_id < 0 else token_id


def _special_tokens_from_config(directory: str) -> dict[str, str]:
    """`bos_token` / `eos_token` of a `tokenizer_config.json` in `directory`, if there is one."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"tokenizer config {path!r} cannot be read: {error}") from error
    if not isinstance(config, dict):
        raise InputError(
            f"tokenizer config {path!r} must hold a JSON object, got {type(config).__name__}"
        )
    specials = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    return specials


def _is_tiktoken(path: str) -> bool:
    """Whether a file starts as tiktoken's BPE ranks do ("<base64 token> <rank>" lines), which
    Meta ships as LLaMA 3's tokenizer.model, a name SentencePiece's files use."""
    try:
        with open(path, "rb") as f:
            return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n", f.readline(256)) is not None
    except OSError:  # unreadable: the caller's error names the file
        return False


def _tiktoken_hint(path: str) -> str:
    """What to pass instead of a tiktoken `tokenizer.model`: the checkpoint's tokenizer.json,
    named where it lies beside the file or one folder up (Meta's `original/tokenizer.model`)."""
    hint = " (a tiktoken file, as LLaMA 3's: pass its tokenizer.json"
    folder = os.path.dirname(os.path.abspath(path))
    for candidate in (folder, os.path.dirname(folder)):
        json_path = os.path.join(candidate, "tokenizer.json")
        if os.path.isfile(json_path):
            return f"{hint}, {json_path!r})"
    return f"{hint})"
