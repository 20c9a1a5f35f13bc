"""Decoding with the model: prefill/decode_step against the forward, sampling, generate, the CLI."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dga_jax
from dga_jax import DGAConfig, Llama, ModelConfig, RopeScaling
from dga_jax.checkpoint.orbax_io import save_model
from dga_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from dga_jax.generate import (
    Buckets,
    Sampling,
    _decode,
    _prefill_rows,
    completions,
    prefill,
    sample,
    sample_allowed,
)
from dga_jax.generate.__main__ import TextStream, main
from dga_jax.generate.inputs import end_ids
from dga_jax.generate.long_rope import switch_position
from tests.conftest import FORWARD_TOL, assert_close, cache_row, run_on_fake_devices
from tests.data.conftest import train_sentencepiece

TOL = FORWARD_TOL[jnp.float32]
TINY = ModelConfig.preset("tiny", num_layers=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DGA = DGAConfig(4, 0.1)


def model(attention: str = "dga", dga: DGAConfig = DGA) -> Llama:
    return Llama(TINY.replace(attention=attention, dga=dga), rngs=nnx.Rngs(0))


def tokens(b=2, t=40, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, TINY.vocab_size)


@jax.jit
def _decode_all(state, graphdef, caches, rest):
    """Feeds rest [B, N] one token per step: logits [B, N, V]."""
    llama = nnx.merge(graphdef, state)

    def one(caches, token):
        step_logits, caches = llama.decode_step(token, caches)
        return caches, step_logits

    _, steps = jax.lax.scan(one, caches, rest.T)
    return steps.swapaxes(0, 1)


def prefill_then_decode(llama: Llama, x: jax.Array, prompt_len: int) -> jax.Array:
    """Logits [B, T, V]: `Llama.prefill` of P tokens, then `decode_step` for the rest."""
    graphdef, state = nnx.split(llama)
    logits, caches = jax.jit(llama.prefill, static_argnums=1)(x[:, :prompt_len], x.shape[1])
    assert caches.length.shape == (TINY.num_layers, x.shape[0])
    return jnp.concatenate([logits, _decode_all(state, graphdef, caches, x[:, prompt_len:])], 1)


def test_streaming_prefill_and_decode_logits_equal_the_forward_at_every_position():
    llama, x = model(dga=DGAConfig(4, 0.1, "streaming")), tokens()
    assert_close(prefill_then_decode(llama, x, 7), jax.jit(llama.__call__)(x), TOL)


def test_prefill_last_only_gives_the_last_logits_and_the_same_caches():
    llama, x = model(), tokens(t=21)
    prefill = jax.jit(llama.prefill, static_argnums=1, static_argnames="last_only")
    logits, caches = prefill(x, 30)
    last, last_caches = prefill(x, 30, last_only=True)
    assert last.shape == (2, 1, TINY.vocab_size)
    assert_close(last, logits[:, -1:], TOL)
    for a, b in zip(jax.tree.leaves(caches), jax.tree.leaves(last_caches), strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefill_selects_once_for_its_attention_and_its_cache():
    # DGA's selection (importance passes, radix select) is loops: prefill compiles to as many
    # as the forward does, not a second set for the cache.
    llama, x = model(), tokens(t=40)
    graphdef, state = nnx.split(llama)

    def loops(fn):
        return jax.jit(fn).lower(state, x).compile().as_text().count(" while(")

    forward = loops(lambda state, x: nnx.merge(graphdef, state)(x))
    prefill = loops(lambda state, x: nnx.merge(graphdef, state).prefill(x, 48))
    assert prefill == forward > 1, (prefill, forward)


def test_dense_decoding_equals_the_dense_forward():
    llama, x = model("dense"), tokens(t=30)
    assert_close(prefill_then_decode(llama, x, 12), jax.jit(llama.__call__)(x), TOL)


def test_sliding_window_decoding_equals_its_forward():
    # Mistral's window: each token sees the 5 last keys, its own included, prefilled or decoded.
    llama = Llama(TINY.replace(attention="dense", sliding_window=5), rngs=nnx.Rngs(0))
    x = tokens(t=30)
    forward = jax.jit(llama.__call__)(x)
    assert_close(prefill_then_decode(llama, x, 12), forward, TOL)
    causal = jax.jit(model("dense").__call__)(x)
    assert_close(forward[:, :5], causal[:, :5], TOL)  # their whole past fits in the window
    assert float(jnp.abs(forward[:, 5:] - causal[:, 5:]).max()) > 1e-2


def test_rows_of_different_lengths_equal_their_runs_alone():
    # Global selection depends on the prompt length: each row must see only its own tokens.
    # Rows of one length are prefilled together: grouped, the rows come out as 0, 3, 1, 2, an
    # order that is not its own inverse, so putting them back is checked.
    llama, x = model(), np.asarray(tokens(4, 36, seed=1))
    graphdef, state = nnx.split(llama)
    lengths, steps = [30, 9, 9, 30], 6
    rest = np.stack([x[i, n : n + steps] for i, n in enumerate(lengths)])

    capacity = dga_jax.prefix_capacity(DGA, 40, lengths)  # shared: one compile per length

    def run(rows):
        logits, caches = prefill(llama, x[rows], [lengths[i] for i in rows], 40, capacity)
        decoded = _decode_all(state, graphdef, caches, jnp.asarray(rest[rows]))
        return jnp.concatenate([logits[:, None], decoded], axis=1)

    batched = run([0, 1, 2, 3])
    for i in range(4):
        assert_close(batched[i], run([i])[0], TOL)
    for i, j in ((0, 3), (1, 2)):  # the same lengths, different prompts
        assert float(jnp.abs(batched[i] - batched[j]).max()) > 1e-3
    forward = jax.jit(llama.__call__)(jnp.asarray(x[1:, : lengths[1]]))
    assert_close(batched[1, 0], forward[0, -1], TOL)


@pytest.mark.parametrize(
    "attention, selection", [("dga", "global"), ("dga", "streaming"), ("dense", "global")]
)
def test_a_bucketed_prefill_gives_each_row_its_prefill_alone(attention, selection):
    # One call over rows right-padded to a bucket of 32: lengths below m = 4, multiples of
    # neither m nor m' = 5; logits and every layer's cache equal each prompt's exact prefill.
    config = DGAConfig(4, 0.1, selection)
    llama = model(attention, config)
    lengths, width, max_len = [31, 3, 9, 14, 22], 32, 48
    x = np.asarray(tokens(len(lengths), width, seed=3))
    capacity = dga_jax.prefix_capacity(config, max_len, range(1, width + 1))
    capacity = capacity if attention == "dga" else None
    logits, caches = prefill(llama, x, lengths, max_len, capacity)
    for i, n in enumerate(lengths):
        alone_logits, alone = prefill(llama, x[i : i + 1, :n], [n], max_len, capacity)
        assert_close(logits[i], alone_logits[0], TOL)
        for layer in range(TINY.num_layers):
            got = cache_row(jax.tree.map(lambda leaf, j=layer: leaf[j], caches), i)
            want = cache_row(jax.tree.map(lambda leaf, j=layer: leaf[j], alone), 0)
            for name in want:
                assert_close(got[name], want[name], TOL)


PROMPT_LENGTHS = (3, 14, 31, 17)


def test_batched_bucketed_generation_equals_each_prompt_alone():
    # Batches of 3, longest first: the results come back in the prompts' order.
    llama, rng = model(), np.random.RandomState(0)
    prompts = [rng.randint(3, 500, size=n).tolist() for n in PROMPT_LENGTHS]
    got = dga_jax.generate(llama, prompts, 5, batch_size=3, buckets=Buckets(16))
    exact = Buckets(growth="exact")
    assert got == [dga_jax.generate(llama, [p], 5, buckets=exact)[0] for p in prompts]


def test_many_lengths_compile_once_per_bucket(capsys):
    llama, rng = model(), np.random.RandomState(1)
    lengths = [5, 7, 11, 13, 16, 17, 19, 23, 29, 31, 33, 40, 47, 52, 58, 61]
    prompts = [rng.randint(3, 500, size=n).tolist() for n in lengths]
    buckets = Buckets(16)  # 16, 32, 64
    _prefill_rows.clear_cache()
    _decode.clear_cache()
    dga_jax.generate(llama, prompts, 3, batch_size=3, buckets=buckets, progress=True)
    widths = {buckets.round_up(n) for n in lengths}
    assert _prefill_rows._cache_size() <= len(widths) == 3  # 16 lengths, 6 batches
    assert _decode._cache_size() <= len(widths)  # max_len = bucket + round_up(3)
    assert "16/16" in capsys.readouterr().err  # the progress bar, finished


def test_buckets_round_up():
    assert [Buckets(16).round_up(n) for n in (1, 16, 17, 33)] == [16, 16, 32, 64]
    assert [Buckets(10, "linear").round_up(n) for n in (1, 10, 11)] == [10, 10, 20]
    assert Buckets(growth="exact").round_up(37) == 37
    with pytest.raises(ValueError, match="growth must be one of"):
        Buckets(growth="fibonacci")


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (8, 50))
    greedy = sample(logits, jax.random.key(1), Sampling())
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, axis=-1))
    top1 = sample(logits, jax.random.key(1), Sampling(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(top1, greedy)


@pytest.mark.parametrize(
    "sampling, allowed",
    [
        (Sampling(temperature=1.0, top_k=2), {1, 3}),
        (Sampling(temperature=1.0, top_p=0.7), {1, 3}),  # 0.5 + 0.3 reach 0.7
        (Sampling(temperature=2.0, top_k=3, top_p=0.99), {1, 3, 0}),
    ],
)
def test_top_k_and_top_p_sample_only_the_allowed_tokens(sampling, allowed):
    probs = jnp.array([0.15, 0.5, 0.05, 0.3])
    logits = jnp.broadcast_to(jnp.log(probs), (2000, 4))
    drawn = set(np.asarray(sample(logits, jax.random.key(2), sampling)).tolist())
    assert drawn == allowed


def test_top_p_1_is_plain_sampling(monkeypatch):
    # float32's cumulative sum reaches 1.0 before the last token (p ~ 1e-11): top_p=1.0 cut it.
    drawn_from = []
    categorical = jax.random.categorical

    def spy(key, logits, axis=-1):
        drawn_from.append(logits)
        return categorical(key, logits, axis=axis)

    monkeypatch.setattr(jax.random, "categorical", spy)
    logits = jnp.array([[0.0, -20.0, 5.0]])
    for sampling in (Sampling(temperature=1.0), Sampling(temperature=1.0, top_p=1.0)):
        sample(logits, jax.random.key(0), sampling)
    np.testing.assert_array_equal(drawn_from[1], drawn_from[0])
    assert np.isfinite(drawn_from[1]).all()


def test_sampling_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        Sampling(top_k=0)


def test_a_nan_temperature_is_rejected():
    # It passed `temperature < 0` and sampled from NaN logits: always token 0.
    with pytest.raises(ValueError, match="temperature must be a number >= 0, got nan"):
        Sampling(temperature=float("nan"))


def test_stop_tokens_end_their_row_only():
    llama, prompts = model(), [[1, 40, 41, 42], [1, 50, 60]]
    free = dga_jax.generate(llama, prompts, 8)
    assert [len(row) for row in free] == [8, 8]
    # A token of row 0 that neither row produced before: stopping on it ends row 0 there.
    j = next(j for j, t in enumerate(free[0]) if j and t not in free[0][:j] + free[1])
    stopped = dga_jax.generate(llama, prompts, 8, stop_tokens=[free[0][j]])
    assert stopped == [free[0][:j], free[1]]


def test_min_new_tokens_rules_the_stop_tokens_out_of_the_first_token_only():
    llama, prompts = model(), [[1, 40, 41, 42], [1, 50, 60]]
    free = dga_jax.generate(llama, prompts, 8)
    stop = free[0][0]  # row 0's greedy first token
    cut = [row[: row.index(stop)] if stop in row else row for row in free]
    assert dga_jax.generate(llama, prompts, 8, stop_tokens=[stop], min_new_tokens=0) == cut
    assert cut[0] == []
    steps = dga_jax.stream(llama, prompts, 8, stop_tokens=[stop], min_new_tokens=1)
    row = [int(tokens[0]) for tokens in steps]
    logits = np.asarray(jax.jit(llama.__call__)(np.asarray(prompts[:1]))[0, -1])
    assert row[0] == np.argsort(-logits)[1]  # the best token but the stop
    assert stop in row[1:]  # allowed again from the second token on
    held = dga_jax.generate(llama, prompts, 8, stop_tokens=[stop], min_new_tokens=1)
    assert held[0] == row[: row.index(stop, 1)]  # where it ends the row


def test_min_new_tokens_holds_when_sampling():
    llama, prompts = model(), [[1, 40, 41, 42], [1, 50, 60]]
    options = dict(temperature=1.0, stop_tokens=range(256))  # half the vocabulary
    free = dga_jax.generate(llama, prompts, 8, **options)
    held = dga_jax.generate(llama, prompts, 8, min_new_tokens=4, **options)
    assert min(len(row) for row in free) < 4
    assert min(len(row) for row in held) >= 4 and min(len(row) for row in held) < 8


@pytest.mark.parametrize("value", [-1, 1.5, "1", True, None])
def test_min_new_tokens_must_be_a_count(value):
    message = re.escape(f"min_new_tokens must be an int >= 0, got {value!r}")
    with pytest.raises(ValueError, match=message):
        dga_jax.stream(model(), [[1, 2]], 4, stop_tokens=[2], min_new_tokens=value)
    with pytest.raises(ValueError, match=message):
        dga_jax.generate(model(), [[1, 2]], 4, stop_tokens=[2], min_new_tokens=value)


def test_sampled_generation_depends_on_the_seed():
    llama, prompts = model(), [[1, 40, 41, 42], [1, 50, 60]]
    runs = [dga_jax.generate(llama, prompts, 8, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_overflow_raises_before_running():
    # The cache holds the prompt and every new token but the last, which is never fed back.
    with pytest.raises(ValueError, match="max_len=10 tokens but 11 are needed"):
        dga_jax.generate(model(), [[1, 2, 3, 4], [5, 6]], 8, max_len=10)
    assert len(dga_jax.generate(model(), [[1, 2, 3, 4], [5, 6]], 7, max_len=10)[0]) == 7
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dga_jax.generate(model(), [[1, 2], []], 8)


@pytest.mark.parametrize("attention", ["dga", "dense"])
def test_reading_past_max_position_raises_before_running(attention):
    # RoPE has no table to run out of: past max_position the model extrapolated silently.
    llama = Llama(TINY.replace(attention=attention, dga=DGA, max_position=12), rngs=nnx.Rngs(0))
    message = "a prompt of 6 tokens and max_new_tokens=8 need 13 positions, past the model's "
    with pytest.raises(ValueError, match=re.escape(message + "max_position=12")):
        dga_jax.stream(llama, [[1, 2], [1, 2, 3, 4, 5, 6]], 8)
    assert len(dga_jax.generate(llama, [[1, 2, 3, 4, 5, 6]], 7)[0]) == 7  # positions 0..11


def test_decode_step_past_max_len_is_refused_and_a_ring_decodes_on():
    # A full dense cache gave NaN logits silently once DenseCache lost its max_len; a ring of
    # window slots is never full.
    x = tokens(t=8)
    dense = model("dense")
    _, caches = dense.prefill(x[:, :4], 4)
    with pytest.raises(ValueError, match="caches that hold max_len=4 tokens"):
        dense.decode_step(x[:, 4], caches)
    windowed = Llama(TINY.replace(attention="dense", sliding_window=3), rngs=nnx.Rngs(0))
    _, caches = windowed.prefill(x[:, :4], 4)
    for t in range(4, 8):
        logits, caches = windowed.decode_step(x[:, t], caches)
    assert_close(logits, jax.jit(windowed.__call__)(x)[:, -1], TOL)


def test_a_sliding_window_within_max_position_streams_past_it():
    # Every RoPE distance stays below the window, as StreamingLLM's stay below its own.
    config = TINY.replace(attention="dense", max_position=8)
    windowed = Llama(config.replace(sliding_window=8), rngs=nnx.Rngs(0))
    assert len(dga_jax.generate(windowed, [[1, 2, 3, 4, 5, 6]], 7)[0]) == 7
    wide = Llama(config.replace(sliding_window=9), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="past the model's max_position=8"):
        dga_jax.generate(wide, [[1, 2, 3, 4, 5, 6]], 7)


def test_streaming_llm_streams_past_max_position():
    # Its RoPE distances are bounded by its window: streaming on is what it is for.
    config = TINY.replace(attention="streaming_llm", max_position=8)
    assert len(dga_jax.generate(Llama(config, rngs=nnx.Rngs(0)), [[1, 2, 3, 4, 5, 6]], 7)[0]) == 7


@pytest.mark.parametrize("attention", ["dga", "dense"])
def test_an_empty_prompt_prefill_names_the_problem(attention):
    with pytest.raises(ValueError, match="sequence length L must be >= 1"):
        model(attention).prefill(jnp.zeros((1, 0), jnp.int32), 8)


@pytest.mark.parametrize(
    "prompt, lengths, message",
    [
        ([[1, 2, 3, 4, 5]], [4.7], "lengths must be integers of shape"),  # was cut to 4
        ([[1, 2, 3, 4, 5]], [True], "lengths must be integers of shape"),  # was read as 1
        ([[1, 2, 3, 4, 5]], [], r"lengths must be integers of shape \(1,\)"),  # NumPy's min
        ([[1, 2, 3]], [4], r"lengths must lie in \[1, L\] = \[1, 3\]"),
        ([[1, 2, 3]], None, "lengths must give each of the 1 rows its prompt length"),
        ([1, 2, 3], [3], r"tokens must be \[B, T\] right-padded prompts; got shape \(3,\)"),
    ],
)
def test_prefill_names_bad_lengths_and_tokens(prompt, lengths, message):
    # A list of prompts was an AttributeError on .shape; float and bool lengths were accepted.
    with pytest.raises(ValueError, match=message):
        prefill(model(), prompt, lengths, 8)


def test_prefill_takes_prompts_as_a_list():
    logits, _ = prefill(model(), [[1, 2, 3, 4], [5, 6, 0, 0]], [4, 2], 8)
    want, _ = prefill(model(), np.array([[1, 2, 3, 4], [5, 6, 0, 0]]), np.array([4, 2]), 8)
    np.testing.assert_array_equal(logits, want)


@pytest.mark.parametrize("bad", [-1, 512])
def test_ids_outside_the_vocabulary_are_rejected(bad):
    llama = model()
    assert llama.config.vocab_size == 512
    with pytest.raises(ValueError, match=f"prompt 1 holds token id {bad} at position 2"):
        dga_jax.generate(llama, [[1, 2], [3, 4, bad]], 4)
    with pytest.raises(ValueError, match=f"stop token {bad} is outside the model's vocabulary"):
        dga_jax.generate(llama, [[1, 2]], 4, stop_tokens=[2, bad])


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([1, 2, 3], "prompt 0 must be a sequence of token ids, got 1 (prompts holds one per"),
        (["hello"], "prompt 0 must be a sequence of token ids, got 'hello'"),
        ([[1, 2], [3, 4.7]], "prompt 1 holds 4.7 at position 1: ids are ints"),  # was cut to 4
        ([[3, True]], "prompt 0 holds True at position 1: ids are ints"),  # was read as id 1
        (np.array([[1.0, 2.5]]), "prompt 0 holds 1.0 at position 0: ids are ints"),
        ([[1, 2**70]], f"prompt 0 holds token id {2**70} at position 1, outside the model's"),
        (None, "prompts must be a sequence of token-id sequences, got None"),
    ],
)
def test_prompts_that_are_not_token_id_lists_are_named(prompts, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dga_jax.generate(model(), prompts, 2)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(seed=None), "seed must be an int in [-2**63, 2**63), got None"),
        (dict(seed=1.5), "seed must be an int in [-2**63, 2**63), got 1.5"),
        (dict(seed=2**64), f"seed must be an int in [-2**63, 2**63), got {2**64}"),
        (dict(max_len=0), "max_len must be an int >= 1 or None, got 0"),  # was the default
        (dict(max_len=40.0), "max_len must be an int >= 1 or None, got 40.0"),
        (dict(buckets=16), "buckets must be a Buckets, e.g. Buckets(128), got 16"),
        (dict(stop_tokens=2), "stop_tokens must be a sequence of token ids, got 2"),
        (dict(stop_tokens=None), "stop_tokens must be a sequence of token ids, got None"),
        (dict(stop_tokens="\n"), "stop_tokens must be a sequence of token ids, got '\\n'"),
        (dict(stop_tokens=[2.5]), "stop_tokens must be int token ids, got 2.5"),  # never matched
    ],
)
def test_bad_generation_options_are_named(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dga_jax.stream(model(), [[1, 2]], 2, **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        dga_jax.generate(model(), [[1, 2]], 2, **options)


def test_stop_tokens_holding_the_whole_vocabulary_cannot_wait_for_min_new_tokens():
    # Every logit -inf: greedy took id 0, a stop token, as the first token all the same.
    message = "stop_tokens hold every id of the vocabulary [0, 512): no token can be sampled"
    with pytest.raises(ValueError, match=re.escape(message)):
        dga_jax.generate(model(), [[1, 2]], 3, stop_tokens=range(512), min_new_tokens=1)
    assert dga_jax.generate(model(), [[1, 2]], 3, stop_tokens=range(512)) == [[]]


@pytest.mark.parametrize("temperature", [float("inf"), 1e39, 1e-40])
def test_a_temperature_float32_cannot_hold_is_rejected(temperature):
    # inf in float32 made banned logits NaN (-inf / inf): the stop token was sampled anyway.
    with pytest.raises(ValueError, match=re.escape(f"got {temperature!r} (a positive one")):
        Sampling(temperature=temperature)


def test_a_tiny_temperature_samples_the_best_allowed_token():
    # logits / 1e-37 overflowed to inf for every token: the first one won the tie, not the best.
    logits = jnp.array([[100.0, 500.0, 200.0, 300.0]] * 8)
    banned = jnp.array([False, True, False, False])
    drawn = sample_allowed(logits, jax.random.key(0), Sampling(temperature=1e-37), banned)
    np.testing.assert_array_equal(drawn, [3] * 8)


def test_completions_checks_its_arguments_when_called():
    # It was a generator: nothing was checked until the first `next`, far from the call.
    llama = Llama(TINY.replace(max_position=12), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        completions(llama, [[1, 2]], 0)
    with pytest.raises(ValueError, match="need 13 positions, past the model's max_position=12"):
        completions(llama, [[1, 2], [1, 2, 3, 4, 5, 6]], 8, batch_size=1)
    assert list(completions(llama, [[1, 2]], 3)) == dga_jax.generate(llama, [[1, 2]], 3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "tiny"
    save_model(model(), path)
    return path


def test_cli_streams_the_greedy_continuation(checkpoint):
    command = [sys.executable, "-m", "dga_jax.generate", "--checkpoint", str(checkpoint)]
    command += ["--tokenizer", "byte", "--prompt", "def f", "--max_new_tokens", "6"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = ByteTokenizer()
    ids = [tokenizer.bos_id, *tokenizer.encode("def f")]
    new = dga_jax.generate(model(), [ids], 6, stop_tokens=[tokenizer.eos_id])[0]
    assert result.stdout == "def f" + tokenizer.decode(new) + "\n"


def test_cli_stops_at_the_checkpoints_eos_ids(tmp_path, capsys):
    # It stopped at the tokenizer's EOS only: Llama-3-Instruct's <|eot_id|> comes with the
    # checkpoint (generation_config.json), not with its tokenizer.
    tokenizer = ByteTokenizer()
    ids = [tokenizer.bos_id, *tokenizer.encode("def f")]
    new = dga_jax.generate(model(), [ids], 6, stop_tokens=[tokenizer.eos_id])[0]
    cut = next(j for j in range(1, len(new)) if new[j] not in new[:j])
    config = TINY.replace(attention="dga", dga=DGA, eos_token_ids=(new[cut],))
    save_model(Llama(config, rngs=nnx.Rngs(0)), tmp_path / "tiny")  # model()'s weights
    main(["--checkpoint", str(tmp_path / "tiny"), "--tokenizer", "byte", "--prompt", "def f"])
    assert capsys.readouterr().out == "def f" + tokenizer.decode(new[:cut]) + "\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint", "missing-dir"], "--checkpoint 'missing-dir' is not a directory"),
        (["--tokenizer", "no/such.model"], "--tokenizer 'no/such.model' could not be loaded"),
        (["--prompt", ""], "--prompt is empty"),
        (["--top_p", "2"], "top_p must be a number in"),
        (  # a setting the model refuses when it is built
            ["--attention", "minference", "--attention_settings", "slash_size=100000"],
            "slash_size=100000 exceeds the model's max_position",
        ),
    ],
)
def test_cli_names_the_problem(checkpoint, flags, message):
    args = {"--checkpoint": str(checkpoint), "--tokenizer": "byte", "--prompt": "x"}
    args.update(zip(flags[::2], flags[1::2], strict=True))
    with pytest.raises(SystemExit, match=message):
        main([item for pair in args.items() for item in pair])


def test_cli_max_position_bounds_the_prompt_and_the_new_tokens(checkpoint, capsys):
    # A prompt past max_position was told to call load_model(..., max_position=N): no CLI flag.
    args = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--max_new_tokens", "6"]
    message = "--prompt (9 tokens) and --max_new_tokens 6 need 14 positions, past the model's "
    message += "max_position=8: shorten --prompt, lower --max_new_tokens or pass --max_position"
    with pytest.raises(SystemExit, match=re.escape(message)):
        main([*args, "--prompt", "abcdefgh", "--max_position", "8"])
    main([*args, "--prompt", "x", "--max_position", "7"])  # positions 0 .. 6
    tokenizer = ByteTokenizer()
    new = dga_jax.generate(
        model(), [[tokenizer.bos_id, *tokenizer.encode("x")]], 6, stop_tokens=[2]
    )
    assert capsys.readouterr().out == "x" + tokenizer.decode(new[0]) + "\n"


class _NoBosTokenizer(ByteTokenizer):
    """Bytes without BOS, whitespace encoded to nothing (as some BPE vocabularies do)."""

    bos_id = None

    def encode(self, text: str) -> list[int]:
        return super().encode(text.strip())


def _no_bos_tokenizer(spec: str) -> _NoBosTokenizer:
    return _NoBosTokenizer()


def test_cli_names_a_prompt_that_encodes_to_no_tokens(checkpoint, monkeypatch):
    # max() of the empty ids raised a bare ValueError with a traceback.
    monkeypatch.setattr(sys.modules[main.__module__], "load_tokenizer", _no_bos_tokenizer)
    args = ["--checkpoint", str(checkpoint), "--tokenizer", "bpe", "--prompt", "  "]
    with pytest.raises(SystemExit, match=re.escape("--prompt '  ' encodes to no tokens")):
        main(args)


def test_cli_stops_quietly_when_its_reader_leaves(checkpoint):
    # `... | head -c 1` printed a BrokenPipeError traceback.
    command = [sys.executable, "-m", "dga_jax.generate", "--checkpoint", str(checkpoint)]
    command += ["--tokenizer", "byte", "--prompt", "def f", "--max_new_tokens", "32"]
    pipe = subprocess.PIPE
    with subprocess.Popen(command, stdout=pipe, stderr=pipe, cwd=ROOT) as process:
        assert process.stdout.read(1) == b"d"  # the echoed prompt, flushed with the first token
        process.stdout.close()
        err = process.stderr.read().decode()
        assert process.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-3000:]


def _streamed(tokenizer, context: list[int], new: list[int]) -> tuple[str, list[str]]:
    """What a TextStream writes for `new` after `context`: (all of it, the text after each push)."""
    out = io.StringIO()
    stream, seen = TextStream(tokenizer, context, out), []
    for token in new:
        stream.push(token)
        seen.append(out.getvalue())
    stream.finish()
    return out.getvalue(), seen


def test_text_stream_keeps_the_space_a_sentencepiece_continuation_loses_alone(tmp_path):
    tokenizer = load_tokenizer(train_sentencepiece(tmp_path))
    ids, prompt = tokenizer.encode("the quick brown fox"), tokenizer.encode("the quick")
    assert ids[: len(prompt)] == prompt
    new = ids[len(prompt) :]
    assert tokenizer.decode(new) == "brown fox"  # decoded alone, the space is gone
    text, _ = _streamed(tokenizer, prompt, new)
    assert text == " brown fox\n"


# Long enough for the stream to drop old context several times; ends in characters of two and
# three bytes (byte fallback pieces for the SentencePiece model, which has not seen them).
TEXT = "the quick brown fox jumps over the lazy dog; " * 4 + "café crème brûlée ✓"


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_text_stream_writes_exactly_what_the_new_ids_add(kind, tmp_path):
    tokenizer = ByteTokenizer() if kind == "byte" else load_tokenizer(train_sentencepiece(tmp_path))
    ids = tokenizer.encode(TEXT)
    for cut in range(0, len(ids), 5):  # inside words and, for bytes, inside characters
        context, new = ids[:cut], ids[cut:]
        text, _ = _streamed(tokenizer, context, new)
        # What the CLI echoes (a context cut inside a character ends in U+FFFD), then the stream.
        assert tokenizer.decode(context).rstrip("\ufffd") + text == TEXT + "\n", cut


def test_text_stream_skips_ids_past_a_sentencepiece_vocabulary(tmp_path):
    # A model's vocabulary may be larger than its tokenizer's (training allows it): such an id,
    # sampled, crashed the CLI (SentencePiece's decode raises on it).
    tokenizer = load_tokenizer(train_sentencepiece(tmp_path))
    prompt, new = tokenizer.encode("the quick"), tokenizer.encode(" brown fox")
    text, _ = _streamed(tokenizer, prompt, [new[0], tokenizer.vocab_size, *new[1:]])
    assert text == " brown fox\n"


def test_text_stream_holds_back_a_split_character():
    tokenizer = ByteTokenizer()
    new = tokenizer.encode("é!")  # two bytes, then one
    _, seen = _streamed(tokenizer, tokenizer.encode("a"), new)
    assert seen == ["", "é", "é!"]


SHARDED = textwrap.dedent(
    """
    import tempfile
    import jax, numpy as np
    from flax import nnx
    import dga_jax
    from dga_jax import DGAConfig, Llama, ModelConfig, make_mesh
    from dga_jax.data.tokenizers import ByteTokenizer
    from dga_jax.checkpoint import save_model
    from dga_jax.eval import ModelEngine
    from dga_jax.eval.harness import DGAJaxLM
    from dga_jax.generate import Buckets

    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 500, size=n).tolist() for n in (20, 11, 20)]
    config = ModelConfig.preset("tiny", attention="dga", dga=DGAConfig(4, 0.25))
    expected = dga_jax.generate(Llama(config, rngs=nnx.Rngs(0)), prompts, 6)
    # batch over 8 or 4 devices: the length groups (2 rows, 1 row) are padded to fit
    # the evaluation's scoring too: 3 rows are filled up to the devices that split the batch
    byte = ByteTokenizer()
    scores = ModelEngine(Llama(config, rngs=nnx.Rngs(0)), byte, batch_size=3).score(prompts)
    for shape in [(8, 1, 1, 1), (2, 2, 1, 2)]:
        mesh = make_mesh(shape)
        with jax.set_mesh(mesh):
            got = dga_jax.generate(Llama(config, rngs=nnx.Rngs(0)), prompts, 6)
            sharded_model = Llama(config, rngs=nnx.Rngs(0))
        sharded = ModelEngine(sharded_model, byte, batch_size=3, mesh=mesh).score(prompts)
        assert got == expected, (shape, got, expected)
        for a, b in zip(sharded, scores):
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    # LongRoPE's switch under a batch split: rows of 20 and 11 tokens re-prefilled (at different
    # steps) at the original context's 25th token, the caches' rows set on their devices
    factors = dict(short_factor=(1.0,) * 16, long_factor=tuple(1.0 + 2 * i for i in range(16)))
    scaling = dga_jax.RopeScaling("longrope", original_max_position=24, **factors)
    long_rope = config.replace(rope_scaling=scaling)
    expected = dga_jax.generate(Llama(long_rope, rngs=nnx.Rngs(0)), prompts, 16)
    with jax.set_mesh(make_mesh((8, 1, 1, 1))):
        got = dga_jax.generate(Llama(long_rope, rngs=nnx.Rngs(0)), prompts, 16)
    assert got == expected, ("longrope", got, expected)
    # and under a sequence split: prompts in a bucket of 24, the re-prefill's 25 tokens padded
    # to the next bucket (32), which the split divides as it divides the batch's
    eights = Buckets(8, "linear")
    expected = dga_jax.generate(Llama(long_rope, rngs=nnx.Rngs(0)), prompts, 16, buckets=eights)
    with jax.set_mesh(make_mesh((2, 1, 4, 1))):
        got = dga_jax.generate(Llama(long_rope, rngs=nnx.Rngs(0)), prompts, 16, buckets=eights)
    assert got == expected, ("longrope, sequence split", got, expected)
    # the sequence split too: DGA's own split (padded rows: the prefill's layout holds their
    # lengths) and Ulysses for a model trained in zig-zag order (prompts are in position order)
    # (one device ignores context_order: one expected generation serves both)
    long = [rng.randint(3, 500, size=n).tolist() for n in (100, 70, 100)]
    expected = dga_jax.generate(Llama(config, rngs=nnx.Rngs(0)), long, 6)
    for order, shape in [("contiguous", (2, 1, 4, 1)), ("zigzag", (4, 1, 2, 1))]:
        ordered = config.replace(context_order=order)
        with jax.set_mesh(make_mesh(shape)):
            got = dga_jax.generate(Llama(ordered, rngs=nnx.Rngs(0)), long, 6)
        assert got == expected, (order, shape, got, expected)
    # a dense model on that split runs blockwise only: the model's key is named
    dense_xla = config.replace(attention="dense", attention_impl="xla")
    with jax.set_mesh(make_mesh((2, 1, 4, 1))):
        try:
            dga_jax.generate(Llama(dense_xla, rngs=nnx.Rngs(0)), long, 2)
            raise AssertionError("a dense 'xla' model ran on a split sequence")
        except ValueError as error:
            assert str(error).startswith("model.attention_impl='xla': dense attention"), error
    # the lm-eval backend from its CLI arguments: loaded sharded on the mesh it names
    ckpt = tempfile.mkdtemp() + "/ckpt"
    save_model(Llama(config, rngs=nnx.Rngs(0)), ckpt)
    lm = DGAJaxLM.create_from_arg_string(f"checkpoint={ckpt},tokenizer=byte,mesh=2x-1x1x2")
    assert dict(lm.engine.mesh.shape) == {"data": 2, "fsdp": 2, "seq": 1, "tensor": 2}
    wq = lm.engine.model.layers.attn.q.value
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated, wq.sharding
    for a, b in zip(lm.engine.score(prompts), scores):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    print("ok")
    """
)


def test_generation_and_scoring_under_a_mesh_equal_one_device():
    run_on_fake_devices(SHARDED)


def test_cli_max_position_must_be_positive(checkpoint, capsys):
    # --max_position 0 reached ModelConfig, whose error named no flag.
    args = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--prompt", "x"]
    with pytest.raises(SystemExit):
        main([*args, "--max_position", "0"])
    assert "argument --max_position: must be a positive integer, got 0" in capsys.readouterr().err


def test_cli_ctrl_c_ends_the_text_without_a_traceback(checkpoint, monkeypatch, capsys):
    def interrupted(*args):
        sys.stdout.write("abc")
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules[main.__module__], "_write", interrupted)
    args = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--prompt", "x"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 130
    assert capsys.readouterr() == ("abc\n", "python -m dga_jax.generate: interrupted\n")


def test_cli_ctrl_c_while_loading_ends_without_a_traceback(checkpoint, monkeypatch, capsys):
    # Loading and compiling a 7B model takes minutes, the likeliest time for Ctrl-C: that was a
    # KeyboardInterrupt traceback.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules[main.__module__], "load_model", interrupted)
    args = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--prompt", "x"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 130
    assert capsys.readouterr() == ("", "python -m dga_jax.generate: interrupted\n")


def test_cli_max_position_that_is_no_number_names_the_flag(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--prompt", "x"]
    with pytest.raises(SystemExit):
        main([*args, "--max_position", "abc"])
    err = capsys.readouterr().err
    assert "argument --max_position: must be a positive integer, got 'abc'" in err


def test_end_ids_are_the_tokenizers_eos_then_the_given_stops_or_the_checkpoints():
    config = TINY.replace(eos_token_ids=(7, 2, TINY.vocab_size, -1))  # two never chosen
    assert end_ids(config, 2) == (2, 7)  # deduplicated, the tokenizer's first
    assert end_ids(config, None) == (7, 2)
    assert end_ids(config, 2, stop_tokens=[9, 2]) == (2, 9)  # given stops replace the config's
    assert end_ids(TINY.replace(eos_token_ids=None), None) == ()


# LongRoPE with an original context of 24: 16 divisors each for the tiny preset's 32 channels
LONG_ROPE = RopeScaling(
    "longrope",
    original_max_position=24,
    short_factor=tuple(1.0 + 0.1 * i for i in range(16)),
    long_factor=tuple(1.0 + 2.0 * i for i in range(16)),
)


EXACT = Buckets(growth="exact")


def _long_rope_model(dga: DGAConfig) -> Llama:
    config = TINY.replace(attention="dga", dga=dga, rope_scaling=LONG_ROPE, max_position=96)
    return Llama(config, rngs=nnx.Rngs(0))


def _argmax_whole(llama: Llama, sequence: list[int], original: int) -> list[int]:
    """The greedy token after each prefix of `sequence` by a forward over that prefix alone:
    causal, so one forward over the first `original` tokens (short factors) and one over all
    (long factors, what every prefix longer than `original` rotates with) give them all."""
    short = llama(jnp.asarray([sequence[:original]]))[0]
    long = llama(jnp.asarray([sequence]))[0]
    return [int(jnp.argmax(short[t] if t < original else long[t])) for t in range(len(sequence))]


def test_longrope_generation_switches_each_row_to_the_long_factors():
    """Rows of 10 and 20 tokens cross the original context (24) at different steps, one of 30
    starts past it: with LongRoPE's switch (`generate.long_rope`) each greedy token is the one
    a forward over the row's whole sequence so far gives (causal DGA: streaming selection)."""
    llama = _long_rope_model(DGAConfig(4, 0.25, selection="streaming"))
    prompts = [np.asarray(tokens(1, n, seed=n)[0]).tolist() for n in (10, 20, 30)]
    for prompt, new in zip(
        prompts, dga_jax.generate(llama, prompts, 20, buckets=EXACT), strict=True
    ):
        expected = _argmax_whole(llama, prompt + new, LONG_ROPE.original_max_position)
        assert new == expected[len(prompt) - 1 : -1]


def test_longrope_generation_with_global_selection_has_the_prefix_room_to_switch():
    """Global selection re-prefills a row at the original context's 25 tokens, which here
    needs one prefix slot more than any prompt up to the bucket (2) decoded to max_len (42):
    sized for it, the batch's rows generate as each alone."""
    llama = _long_rope_model(DGAConfig(4, 0.25))
    prompts = [np.asarray(tokens(1, n, seed=n)[0]).tolist() for n in (1, 2)]
    together = dga_jax.generate(llama, prompts, 40, buckets=EXACT)
    alone = [dga_jax.generate(llama, [p], 40, buckets=EXACT)[0] for p in prompts]
    assert together == alone


def test_the_switch_is_set_up_only_where_a_row_feeds_the_original_context():
    config = TINY.replace(rope_scaling=LONG_ROPE)  # original context 24

    def position(lengths, new, config=config):
        return switch_position(config, np.asarray(lengths), new)

    assert position([10], 16) == 24  # feeds positions 10 .. 24
    assert position([10], 15) is None  # up to 23: never past the original context
    assert position([24], 2) == 24  # its first fed token sits there
    assert position([25, 30], 40) is None  # prefilled past it: long factors from the start
    assert position([30, 10], 16) == 24  # one row of the batch is enough
    assert position([10], 16, TINY) is None  # no LongRoPE
