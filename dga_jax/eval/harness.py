"""Our model as an lm-evaluation-harness (`lm_eval` 0.4.x) backend: `--model dga_jax`.

lm_eval finds models only in its own registry (0.4.13 scans no plugin entry points, and
`--include_path` adds tasks, not models), so its CLI runs through this module, which registers
`dga_jax` before handing the arguments over:

    python -m dga_jax.eval.harness --model dga_jax \\
        --model_args checkpoint=ckpt/tiny,tokenizer=byte,attention=dga,selection=streaming \\
        --tasks lambada_openai,hellaswag --batch_size 16

`--model_args` keys: checkpoint, tokenizer (as `load_tokenizer` takes them), attention,
selection, group_size, focal_ratio (None: the checkpoint's), batch_size, max_length (default:
the model's max_position), max_gen_toks (default 256), mesh ("data x fsdp x seq x tensor"
device counts, one of them -1 for the rest; default 1x-1x1x1, parameters split over all
devices; `x`, as lm_eval splits the arguments at commas), attention_settings (the baselines'
fields, ";"-separated: `attention_settings=start_size=4;recent_size=2000`). lm_eval's
`--device` and `--max_batch_size` are ignored (JAX places the arrays; batches have a fixed
size); a batch_size in `--model_args` wins over lm_eval's `--batch_size` default of 1. From
Python:
`lm_eval.simple_evaluate(model=DGAJaxLM(engine), tasks=[...])`.

Conventions, those of lm_eval's `hf` backend on a LLaMA tokenizer except where noted:

- loglikelihood: the context is encoded behind BOS (when the tokenizer has one) and the pair
  is encoded whole, then split at the context's length, with the context's trailing whitespace
  moved to the continuation (`TemplateLM._encode_pair`); an empty context (a whitespace-only
  one too, for a tokenizer without BOS) becomes the prefix token (BOS, else EOS). Sequences
  are left-truncated to `max_length` tokens.
- loglikelihood_rolling: the text's tokens, without BOS, conditioned on the prefix token, in
  disjoint windows (`get_rolling_token_windows` + `make_disjoint_window`, context 1): every
  token is predicted once, each window with as much context as fits. `hf` also prepends BOS
  to the text, so its first window predicts BOS after BOS (lm_eval issue #3333); not here.
- `max_length` counts every token the engine reads, the last predicted one included (`hf`
  does not feed that one): at the limit there is one token less of context than with `hf`,
  and the model never sees a position at or past `max_length`.
- generate_until: greedy only (do_sample=True or temperature > 0 is an error; top_k/top_p
  are ignored; max_gen_toks must be at least 1); the prompt is left-truncated to `max_length -
  max_gen_toks` (an empty one is the prefix token); the text is cut at the first stop string
  of `until`. Generation itself stops at the EOS id (whose text, dropped by our tokenizers'
  `decode`, is therefore never matched as a string).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
import tqdm
from lm_eval import utils
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text

from dga_jax.checkpoint.orbax_io import attention_changes, load_model, parse_settings
from dga_jax.data.tokenizers import load_tokenizer
from dga_jax.errors import ConfigError
from dga_jax.eval.engine import Engine, ModelEngine, TokenScores, with_bos
from dga_jax.eval.model_args import (
    TEXT_ARGS,
    parse_batch_size,
    parse_max_gen_toks,
    parse_mesh,
    text_args,
)
from dga_jax.sharding import make_mesh, mesh_shape

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)
R = TypeVar("R")
# Settings lm_eval passes to every model that mean nothing here.
IGNORED_SETTINGS = ("device", "max_batch_size")


@register_model("dga_jax")
class DGAJaxLM(TemplateLM):
    """lm_eval's three request types over an `Engine` (`ModelEngine` for our `Llama`)."""

    chunk = 256  # requests per engine call: a progress-bar step, sorted longest first within

    def __init__(self, engine: Engine, *, max_gen_toks: int = 256):
        super().__init__()
        if engine.tokenizer.bos_id is None and engine.tokenizer.eos_id is None:
            raise ValueError("the tokenizer has neither BOS nor EOS to condition the text on")
        self.engine, self.tokenizer = engine, engine.tokenizer
        # Checked now: a bad default would otherwise end the run at its first generate_until
        # request, after every loglikelihood task before it.
        self._max_gen_toks = parse_max_gen_toks(max_gen_toks, "max_gen_toks")

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        tokenizer: str,
        *,
        attention: str | None = None,
        selection: str | None = None,
        group_size: int | None = None,
        focal_ratio: float | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        mesh: str = "1x-1x1x1",
        attention_settings: str = "",
    ) -> DGAJaxLM:
        """Loads a `save_model` checkpoint, its attention and DGA settings replaced where given,
        sharded on a `mesh` of "data x fsdp x seq x tensor" device counts (-1: the rest)."""
        batch_size = parse_batch_size(batch_size)
        mesh_ = make_mesh(mesh_shape(parse_mesh(mesh), len(jax.devices()), "mesh"))
        changes = attention_changes(
            checkpoint,
            attention,
            selection=selection,
            group_size=group_size,
            focal_ratio=focal_ratio,
            settings=parse_settings(attention_settings, "attention_settings"),
        )
        model = load_model(checkpoint, mesh=mesh_, **changes)
        engine = ModelEngine(
            model,
            load_tokenizer(tokenizer),
            batch_size=batch_size,
            max_length=max_length,
            mesh=mesh_,
        )
        return cls(engine, max_gen_toks=max_gen_toks)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> DGAJaxLM:
        """`--model_args checkpoint=...,tokenizer=...` (see the module docstring). lm_eval's
        parser reads `checkpoint=000200` as the int 200: the `TEXT_ARGS` keep their text."""
        args = utils.simple_parse_args_string(arg_string)
        return cls.create_from_arg_obj({**args, **text_args(arg_string)}, additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict | None = None
    ) -> DGAJaxLM:
        """`from_checkpoint(**arg_dict)`; lm_eval's own settings fill in what it leaves out.
        A key `from_checkpoint` does not take, or a missing checkpoint / tokenizer, is a
        ConfigError naming it; checkpoint, tokenizer and mesh are taken as strings."""
        check_model_args(arg_dict)
        extra = {
            k: v
            for k, v in (additional_config or {}).items()
            if v is not None and k not in IGNORED_SETTINGS
        }
        text = {k: str(arg_dict[k]) for k in TEXT_ARGS if k in arg_dict}
        return cls.from_checkpoint(**{**extra, **arg_dict, **text})

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS, else EOS."""
        bos = self.tokenizer.bos_id
        return self.tokenizer.eos_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Ids of `string` behind BOS, unless `add_special_tokens` is False (as a Hugging Face
        LLaMA tokenizer encodes)."""
        if add_special_tokens is False:
            return self.tokenizer.encode(string)
        return with_bos(self.tokenizer, string)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
    ) -> list[tuple[float, bool]]:
        """((context, continuation), context ids, continuation ids) -> (log p, is_greedy)."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = self._score_pairs(pairs, disable_tqdm, "loglikelihood")
        for (strings, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """log p(text | prefix token) of each request's `(text,)`, over disjoint windows."""
        windows = [self._rolling_windows(request.args[0]) for request in requests]
        flat = [pair for pairs in windows for pair in pairs]
        scores = iter(self._score_pairs(flat, disable_tqdm, "loglikelihood_rolling"))
        totals = [sum(next(scores)[0] for _ in pairs) for pairs in windows]
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of `(context, gen_kwargs)`, cut at the first `until` string."""
        settings = [self._greedy_settings(request.args[1]) for request in requests]
        texts = [""] * len(requests)
        desc = "Running generate_until requests"
        with tqdm.tqdm(total=len(requests), desc=desc, disable=disable_tqdm) as bar:
            for budget in sorted({budget for _, budget in settings}):
                rows = [i for i, (_, b) in enumerate(settings) if b == budget]
                contexts = [requests[i].args[0] for i in rows]
                for i, ids in zip(rows, self._generate(contexts, budget, bar), strict=True):
                    texts[i] = postprocess_generated_text(
                        self.tokenizer.decode(ids), settings[i][0], None
                    )
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _greedy_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
        """(until, max_gen_toks) of a request's generation kwargs; sampling is refused."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs["do_sample"] or kwargs.get("temperature", 0.0) > 0:
            raise ValueError(
                "the dga_jax backend generates greedily only; got do_sample="
                f"{kwargs['do_sample']}, temperature={kwargs.get('temperature')}"
            )
        return kwargs["until"], kwargs["max_gen_toks"]

    def _generate(self, contexts: list[str], budget: int, bar: tqdm.tqdm) -> list[list[int]]:
        """Up to `budget` new ids after each context, its prompt left-truncated to fit (an
        empty prompt, from a tokenizer without BOS, is the prefix token)."""
        parse_max_gen_toks(budget, "a request's max_gen_toks")
        room = self.max_length - budget
        if room < 1:
            raise ValueError(
                f"max_gen_toks={budget} leaves no room for a prompt in max_length={self.max_length}"
            )
        prefix = [self.prefix_token_id]
        prompts = [self.tok_encode(context)[-room:] or prefix for context in contexts]
        generate = functools.partial(self.engine.generate, max_new_tokens=budget)
        return self._run(generate, prompts, bar)

    def _rolling_windows(self, text: str) -> list[Pair]:
        """Disjoint (context, prediction) windows predicting every token of `text` once, each
        window (context and prediction) at most `max_length` tokens."""
        windows = utils.get_rolling_token_windows(
            token_list=self.tok_encode(text, add_special_tokens=False),
            prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length - 1,
            context_len=1,
        )
        return [utils.make_disjoint_window(window) for window in windows]

    def _score_pairs(
        self, pairs: Sequence[Pair], disable_tqdm: bool, kind: str
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) per pair."""
        sequences = [self._truncated(context, continuation) for context, continuation in pairs]
        desc = f"Running {kind} requests"
        with tqdm.tqdm(total=len(pairs), desc=desc, disable=disable_tqdm) as bar:
            scores = self._run(self.engine.score, sequences, bar)
        return [
            continuation_score(s, len(continuation))
            for s, (_, continuation) in zip(scores, pairs, strict=True)
        ]

    def _truncated(self, context: list[int], continuation: list[int]) -> list[int]:
        """The last `max_length` ids of context + continuation, the continuation kept whole. An
        empty context (a whitespace-only one, from a tokenizer without BOS) is the prefix token:
        the first continuation token needs something to be predicted from."""
        if not 0 < len(continuation) < self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens cannot be scored in max_length="
                f"{self.max_length} (it needs 1 to max_length - 1 tokens)"
            )
        return ((context or [self.prefix_token_id]) + continuation)[-self.max_length :]

    def _run(
        self, fn: Callable[[list[list[int]]], list[R]], items: Sequence[list[int]], bar: tqdm.tqdm
    ) -> list[R]:
        """`fn` over `items` in chunks of `chunk`, longest first (little padding, the batch
        shapes of one length bucket together); the results in the items' order."""
        order = np.argsort([-len(item) for item in items], kind="stable")
        out: list[R] = [None] * len(items)  # type: ignore[list-item]
        for first in range(0, len(order), self.chunk):
            rows = order[first : first + self.chunk]
            for i, result in zip(rows, fn([items[i] for i in rows]), strict=True):
                out[i] = result
            bar.update(len(rows))
        return out


def continuation_score(scores: TokenScores, n: int) -> tuple[float, bool]:
    """(sum of the last `n` log-probs, whether each of those tokens is the argmax)."""
    return float(scores.logprobs[-n:].sum()), bool(scores.greedy[-n:].all())


def check_model_args(args: dict[str, Any]) -> None:
    """Raises ConfigError for a `--model_args` key `from_checkpoint` does not take, or a missing
    checkpoint / tokenizer (rather than a TypeError from the call)."""
    parameters = inspect.signature(DGAJaxLM.from_checkpoint).parameters
    unknown = sorted(set(args) - set(parameters))
    if unknown:
        raise ConfigError(
            f"--model_args: unknown keys {unknown} for the dga_jax backend; known: "
            f"{', '.join(parameters)}"
        )
    missing = [name for name in ("checkpoint", "tokenizer") if args.get(name) in (None, "")]
    if missing:
        raise ConfigError(
            f"--model_args: give {' and '.join(missing)} (checkpoint=DIR,tokenizer=SPEC)"
        )


if __name__ == "__main__":
    cli_evaluate()
