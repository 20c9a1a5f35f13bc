"""Engines the evaluation tests share: oracles that answer from the prompt, and a tiny model."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flax import nnx

from dga_jax import DGAConfig, Llama, ModelConfig
from dga_jax.data.tokenizers import ByteTokenizer
from dga_jax.eval.engine import ModelEngine, TokenScores
from dga_jax.generate import Buckets


class OracleEngine:
    """Answers every prompt with `answer(prompt_text)`; scores token t with -t / 100."""

    def __init__(self, answer, max_length: int = 4096):
        self.tokenizer, self.max_length, self.answer = ByteTokenizer(), max_length, answer
        self.generated: list[int] = []  # the max_new_tokens of each call

    def generate(self, prompts, max_new_tokens, stop_tokens=(), min_new_tokens=0):
        self.generated.append(max_new_tokens)
        texts = [self.answer(self.tokenizer.decode(p)) for p in prompts]
        return [self.tokenizer.encode(t)[:max_new_tokens] for t in texts]

    def score(self, sequences):
        out = []
        for s in sequences:
            s = np.asarray(s[1:])
            out.append(TokenScores(-s / 100.0, s % 2 == 0))
        return out


class PromptCounter(ByteTokenizer):
    """Byte tokens, counting the texts encoded that contain `marker` (a task's prompts)."""

    def __init__(self, marker: str):
        self.marker, self.prompts = marker, 0

    def encode(self, text: str) -> list[int]:
        self.prompts += self.marker in text
        return super().encode(text)


def passkey_answer(prompt: str) -> str:
    return re.search(r"The pass key is (\d+)\.", prompt).group(1)


def lines_answer(prompt: str) -> str:
    line = re.search(r"in line (\S+)\?", prompt).group(1)
    number = re.search(f"line {line}: REGISTER_CONTENT is <" + r"(\d+)>", prompt).group(1)
    return f"The number is {number}."


@pytest.fixture(scope="session")
def tiny_engine():
    """A random tiny DGA model (window 1024) behind a ModelEngine with the byte tokenizer."""
    config = ModelConfig.preset("tiny", attention="dga", dga=DGAConfig(16, 0.1), max_position=1024)
    model = Llama(config, rngs=nnx.Rngs(0))
    return ModelEngine(model, ByteTokenizer(), batch_size=4, buckets=Buckets(256))
