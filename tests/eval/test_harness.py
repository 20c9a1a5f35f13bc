"""The lm-evaluation-harness backend: its numbers against our model's own forward, generation
against canned engine output, and a whole `lm_eval.simple_evaluate` run on local tasks."""

from __future__ import annotations

import json
import math
import operator

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from dga_jax import DGAConfig, Llama, ModelConfig
from dga_jax.checkpoint.orbax_io import save_model
from dga_jax.data.tokenizers import ByteTokenizer
from dga_jax.errors import ConfigError, MissingInputError
from dga_jax.eval.engine import ModelEngine, TokenScores
from dga_jax.eval.harness import DGAJaxLM
from dga_jax.ops.sinks import StreamingLLMConfig

# Dense: the backend is the same for every attention, and a dense forward compiles in a third
# of the time. `from_checkpoint` switching to DGA is tested on its own.
TINY = ModelConfig.preset("tiny", num_layers=2, attention="dense")
MAX_LENGTH = 48
BOS = 1
TOK = ByteTokenizer()
# Summed float32 log-probs of up to MAX_LENGTH tokens, batched-and-padded against one row alone.
TOL = dict(rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def model() -> Llama:
    """The random tiny model, its head zeroed outside printable ASCII and newline: greedy text
    is then readable (it decodes to what the test can compare) and reaches no EOS."""
    llama = Llama(TINY, rngs=nnx.Rngs(0))
    text = [ord("\n"), *range(ord(" "), ord("~") + 1)]
    keep = np.zeros(TINY.vocab_size, bool)
    keep[np.asarray(text) + TOK.num_special] = True
    llama.lm_head[...] = jnp.where(keep, llama.lm_head[...], 0.0)
    return llama


@pytest.fixture(scope="module")
def lm(model) -> DGAJaxLM:
    return DGAJaxLM(ModelEngine(model, TOK, batch_size=4, max_length=MAX_LENGTH))


@pytest.fixture(scope="module")
def log_softmax(model):
    """ids (<= MAX_LENGTH) -> [len(ids), V] log p(next token | ids[:t + 1]): one plain row,
    right-padded to MAX_LENGTH so that one compile serves every length (the model is causal)."""
    call = jax.jit(model.__call__)

    def run(ids: list[int]) -> np.ndarray:
        assert len(ids) <= MAX_LENGTH
        logits = call(jnp.asarray([ids + [0] * (MAX_LENGTH - len(ids))]))[0, : len(ids)]
        return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)

    return run


@pytest.fixture(scope="module")
def forward(log_softmax):
    """ids -> (log p(ids[t] | ids[:t]) for t >= 1, whether each is the argmax)."""

    def run(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows, targets = log_softmax(ids)[:-1], np.asarray(ids[1:])
        return rows[np.arange(len(targets)), targets], rows.argmax(-1) == targets

    return run


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def expected_loglikelihood(forward, sequence: list[int], n: int) -> tuple[float, bool]:
    logprobs, greedy = forward(sequence[-MAX_LENGTH:])
    return float(logprobs[-n:].sum()), bool(greedy[-n:].all())


def greedy_char(log_softmax, context: str) -> str:
    """The character the forward predicts after BOS + `context` (printable: see `model`)."""
    return TOK.decode([int(log_softmax([BOS, *TOK.encode(context)])[-1].argmax())])


def test_loglikelihood_equals_the_forward_with_hf_tokenization(lm, forward):
    long_context = "0123456789" * 6
    cases = [
        ("The cat", " sat on the mat", [BOS, *TOK.encode("The cat sat on the mat")], 15),
        # The context's trailing space moves to the continuation.
        ("Hello ", "world", [BOS, *TOK.encode("Hello world")], 6),
        # An empty context is BOS alone.
        ("", "abc", [BOS, *TOK.encode("abc")], 3),
        # Left-truncated to the last MAX_LENGTH tokens.
        (long_context, "tail", [BOS, *TOK.encode(long_context + "tail")], 4),
    ]
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x, _, _ in cases])
    for (_, _, sequence, n), (logprob, greedy) in zip(cases, results, strict=True):
        want, want_greedy = expected_loglikelihood(forward, sequence, n)
        np.testing.assert_allclose(logprob, want, **TOL)
        assert greedy == want_greedy


def test_is_greedy_when_the_continuation_is_the_argmax(lm, log_softmax, forward):
    context = "The cat"
    char = greedy_char(log_softmax, context)
    (_, greedy), (_, other) = lm.loglikelihood(
        [request("loglikelihood", context, char), request("loglikelihood", context, char + "~")]
    )
    assert greedy
    assert other == expected_loglikelihood(forward, [BOS, *TOK.encode(context + char + "~")], 2)[1]


def rolling_expected(forward, text: str) -> float:
    """Disjoint windows written out: MAX_LENGTH - 1 predictions each, the last window with a
    full MAX_LENGTH-token sequence; the first conditioned on BOS."""
    ids, done, total = [BOS, *TOK.encode(text)], 0, 0.0
    while done < len(ids) - 1:
        end = min(done + MAX_LENGTH - 1, len(ids) - 1)
        logprobs, _ = forward(ids[max(0, end + 1 - MAX_LENGTH) : end + 1])
        total += float(logprobs[-(end - done) :].sum())
        done = end
    return total


def test_loglikelihood_rolling_sums_every_token_once(lm, forward):
    short, long = "a short text.", "The quick brown fox jumps over the lazy dog. " * 3
    assert len(long) > 2 * MAX_LENGTH
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in (short, long)])
    whole = forward([BOS, *TOK.encode(short)])[0].sum()
    np.testing.assert_allclose(got[0], whole, **TOL)
    np.testing.assert_allclose(got[1], rolling_expected(forward, long), **TOL)


class CannedEngine:
    """Generates `text`'s ids (up to max_new_tokens) for every prompt, recording the calls."""

    tokenizer = TOK
    max_length = 512

    def __init__(self, text: str):
        self.ids = TOK.encode(text)
        self.calls: list[tuple[list[list[int]], int]] = []

    def generate(self, prompts, max_new_tokens, stop_tokens=(), min_new_tokens=0):
        self.calls.append(([list(p) for p in prompts], max_new_tokens))
        return [self.ids[:max_new_tokens] for _ in prompts]

    def score(self, sequences):
        raise AssertionError("generate_until does not score")


def test_generate_until_cuts_at_the_first_stop_string():
    lm = DGAJaxLM(CannedEngine("Answer: 42\n\nQ: nextSTOP"))
    texts = lm.generate_until(
        [
            request("generate_until", "Q: 6*7?", {"until": ["STOP", "\n\n"]}),
            request("generate_until", "Q: 6*7?", {"until": "STOP"}),
            request("generate_until", "Q: 6*7?", {"until": ["nowhere"], "do_sample": False}),
        ]
    )
    assert texts == ["Answer: 42", "Answer: 42\n\nQ: next", "Answer: 42\n\nQ: nextSTOP"]
    ((prompts, budget),) = lm.engine.calls
    assert prompts == [[BOS, *TOK.encode("Q: 6*7?")]] * 3
    assert budget == 256


def test_generate_until_respects_max_gen_toks_and_truncates_the_prompt():
    engine = CannedEngine("0123456789")
    lm = DGAJaxLM(engine, max_gen_toks=7)
    context = "x" * 600
    texts = lm.generate_until(
        [
            request("generate_until", context, {"until": [], "max_gen_toks": 4}),
            request("generate_until", "hi", {"until": []}),
            request("generate_until", "yo", {"until": [], "max_new_tokens": 4}),
        ]
    )
    assert texts == ["0123", "0123456", "0123"]
    (long_prompts, four), (short_prompts, seven) = engine.calls
    assert (four, seven) == (4, 7)
    assert long_prompts == [TOK.encode(context)[-508:], [BOS, *TOK.encode("yo")]]
    assert short_prompts == [[BOS, *TOK.encode("hi")]]


@pytest.mark.parametrize("settings", [{"do_sample": True}, {"temperature": 0.7}])
def test_generate_until_refuses_sampling(settings):
    lm = DGAJaxLM(CannedEngine("x"))
    with pytest.raises(ValueError, match="greedily only"):
        lm.generate_until([request("generate_until", "hi", {"until": [], **settings})])


@pytest.mark.parametrize("max_gen_toks", [0, -3, "abc", 2.5])
def test_a_default_max_gen_toks_below_one_is_an_error_naming_it(max_gen_toks):
    with pytest.raises(ValueError, match="max_gen_toks must be an integer >= 1"):
        DGAJaxLM(CannedEngine("x"), max_gen_toks=max_gen_toks)


@pytest.mark.parametrize("max_gen_toks", [0, -3])  # lm_eval itself int()s the request's value
def test_a_requests_max_gen_toks_below_one_is_an_error_naming_it(max_gen_toks):
    engine = CannedEngine("x")
    lm = DGAJaxLM(engine)
    settings = {"until": [], "max_gen_toks": max_gen_toks}
    with pytest.raises(ValueError, match="a request's max_gen_toks must be an integer >= 1"):
        lm.generate_until([request("generate_until", "hi", settings)])
    assert engine.calls == []


class NoBosTokenizer(ByteTokenizer):
    @property
    def bos_id(self) -> None:
        return None


class ScoringEngine(CannedEngine):
    """CannedEngine over a tokenizer without BOS that also scores: log p of token t is -t."""

    tokenizer = NoBosTokenizer()

    def score(self, sequences):
        self.calls.append(([list(s) for s in sequences], 0))
        return [TokenScores(-np.arange(1.0, len(s)), np.ones(len(s) - 1, bool)) for s in sequences]


def test_without_bos_an_empty_context_is_the_eos_prefix():
    engine = ScoringEngine("ok")
    lm = DGAJaxLM(engine)
    eos, ids = TOK.eos_id, TOK.encode(" ab")
    # A whitespace-only context moves to the continuation, leaving no context tokens: every
    # continuation token is scored after EOS, none dropped.
    [(logprob, _)] = lm.loglikelihood([request("loglikelihood", " ", "ab")])
    assert (engine.calls[-1][0], logprob) == ([[eos, *ids]], -6.0)
    assert lm.generate_until([request("generate_until", "", {"until": []})]) == ["ok"]
    assert engine.calls[-1] == ([[eos]], 256)


def test_model_args_name_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match=r"unknown keys \['pretrained'\].*known: checkpoint"):
        DGAJaxLM.create_from_arg_string("pretrained=ckpt,tokenizer=byte")
    with pytest.raises(ConfigError, match="give checkpoint and tokenizer"):
        DGAJaxLM.create_from_arg_string("batch_size=2")
    with pytest.raises(ConfigError, match="give checkpoint"):
        DGAJaxLM.create_from_arg_obj({"checkpoint": "", "tokenizer": "byte"})


def test_a_numeric_checkpoint_is_a_path(tmp_path, monkeypatch):
    # lm_eval parses `checkpoint=200` (an Orbax step folder) as the int 200: a bare TypeError.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingInputError, match="no checkpoint directory at .*/200$"):
        DGAJaxLM.create_from_arg_string("checkpoint=200,tokenizer=byte")
    # ... and `000200` as 200, `1e3` as 1000.0, `none` as None: the path as written is taken.
    for written, path in (("000200", "000200"), ("1e3", "1e3"), ("none", "none"), ("'2.0'", "2.0")):
        with pytest.raises(MissingInputError, match=f"no checkpoint directory at .*/{path}$"):
            DGAJaxLM.create_from_arg_string(f"checkpoint={written},tokenizer=byte")


def test_model_args_load_a_checkpoint_with_dga_switched_on(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    args = f"checkpoint={tmp_path / 'ckpt'},tokenizer=byte,attention=dga,selection=streaming"
    args += ",group_size=4,focal_ratio=0.25,max_length=40,max_gen_toks=9"
    # lm_eval's CLI passes its settings along: --batch_size as a string, a CUDA device.
    lm = DGAJaxLM.create_from_arg_string(args, {"batch_size": "3", "device": "cuda:0"})
    config = lm.engine.model.config
    assert (config.attention, config.dga) == ("dga", DGAConfig(4, 0.25, "streaming"))
    assert (lm.engine.batch_size, lm.max_length, lm.max_gen_toks) == (3, 40, 9)
    assert isinstance(lm.tokenizer, ByteTokenizer)
    lm = DGAJaxLM.create_from_arg_obj(
        {"checkpoint": str(tmp_path / "ckpt"), "tokenizer": "byte", "batch_size": 5},
        {"batch_size": 1, "max_batch_size": None},
    )
    assert (lm.engine.model.config.attention, lm.engine.batch_size) == ("dense", 5)
    lm = DGAJaxLM.create_from_arg_string(
        f"checkpoint={tmp_path / 'ckpt'},tokenizer=byte,attention=streaming_llm,"
        "attention_settings=start_size=2;recent_size=30"
    )
    assert lm.engine.model.config.sinks == StreamingLLMConfig(start_size=2, recent_size=30)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        DGAJaxLM.create_from_arg_obj({"checkpoint": "-", "tokenizer": "-"}, {"batch_size": "auto"})
    with pytest.raises(ValueError, match="mesh must be data x fsdp x seq x tensor"):
        DGAJaxLM.create_from_arg_obj({"checkpoint": "-", "tokenizer": "-", "mesh": "1,2"})
    with pytest.raises(ConfigError, match="mesh: give 4 sizes"):
        DGAJaxLM.create_from_arg_obj({"checkpoint": "-", "tokenizer": "-", "mesh": "1x1"})


MC_DOCS = [
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
    {"question": "The sky is", "choices": ["green", "blue"], "label": 1},
    {"question": "Cats say", "choices": ["woof", "meow", "moo"], "label": 1},
]
PPL_DOCS = [{"text": "Hello world, this is a test."}, {"text": "x" * 70 + " two words"}]
GEN_DOCS = [{"question": "Say hi:", "answer": "hi"}, {"question": "Count: 1 2", "answer": "3"}]
TASKS = {
    "dga_mc": dict(
        output_type="multiple_choice",
        doc_to_text="{{question}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
        metric_list=[{"metric": "acc"}],
    ),
    "dga_ppl": dict(
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="{{text}}",
        metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    ),
    "dga_gen": dict(
        output_type="generate_until",
        doc_to_text="{{question}}",
        doc_to_target="{{answer}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        metric_list=[{"metric": "exact_match"}],
    ),
}


def write_tasks(root, cache) -> None:
    """One YAML task and its JSON-lines test split per output type (JSON is valid YAML)."""
    for (name, config), docs in zip(TASKS.items(), (MC_DOCS, PPL_DOCS, GEN_DOCS), strict=True):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        task = dict(
            task=name,
            dataset_path="json",
            dataset_kwargs={"data_files": {"test": str(data)}, "cache_dir": str(cache)},
            test_split="test",
            **config,
        )
        (root / f"{name}.yaml").write_text(json.dumps(task))


def mc_loglikelihoods(forward, doc: dict) -> list[float]:
    """Each choice's log-likelihood after the question and lm_eval's " " delimiter."""
    out = []
    for choice in doc["choices"]:
        sequence = [BOS, *TOK.encode(f"{doc['question']} {choice}")]
        out.append(expected_loglikelihood(forward, sequence, len(choice) + 1)[0])
    return out


def greedy_text(log_softmax, prompt: str, steps: int, stop: str) -> str:
    """Greedy decoding written out with the forward: up to `steps` tokens or EOS, cut at `stop`."""
    ids = [BOS, *TOK.encode(prompt)]
    new: list[int] = []
    while len(new) < steps and (token := int(log_softmax(ids + new)[-1].argmax())) != TOK.eos_id:
        new.append(token)
    return TOK.decode(new).split(stop)[0]


def word_perplexity(forward) -> float:
    words = sum(len(doc["text"].split()) for doc in PPL_DOCS)
    total = sum(rolling_expected(forward, doc["text"]) for doc in PPL_DOCS)
    return math.exp(-total / words)


def by_doc(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=operator.itemgetter("doc_id"))


def run_local_tasks(lm, tmp_path, monkeypatch) -> dict:
    """`simple_evaluate` over the tasks written into tmp_path, with the Hub out of reach."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, tmp_path / "cache")
    return simple_evaluate(
        model=lm,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )


def test_simple_evaluate_runs_every_output_type_on_local_tasks(
    lm, forward, log_softmax, tmp_path, monkeypatch
):
    out = run_local_tasks(lm, tmp_path, monkeypatch)
    results, samples = out["results"], out["samples"]
    expected = [mc_loglikelihoods(forward, doc) for doc in MC_DOCS]
    for sample, want in zip(by_doc(samples["dga_mc"]), expected, strict=True):
        np.testing.assert_allclose([ll for ll, _ in sample["filtered_resps"]], want, **TOL)
    hits = [np.argmax(want) == doc["label"] for want, doc in zip(expected, MC_DOCS, strict=True)]
    assert results["dga_mc"]["acc,none"] == pytest.approx(np.mean(hits))
    np.testing.assert_allclose(
        results["dga_ppl"]["word_perplexity,none"], word_perplexity(forward), rtol=1e-4
    )
    assert results["dga_ppl"]["bits_per_byte,none"] > 0
    for sample, doc in zip(by_doc(samples["dga_gen"]), GEN_DOCS, strict=True):
        assert sample["filtered_resps"] == [greedy_text(log_softmax, doc["question"], 4, "\n")]
    assert 0 <= results["dga_gen"]["exact_match,none"] <= 1
