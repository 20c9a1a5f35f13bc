"""Generate text from a checkpoint, streaming it to stdout as tokens arrive.

    python -m dga_jax.generate --checkpoint ckpt/tiny --tokenizer byte --prompt "def main"

The prompt is echoed as the model reads it (its token ids decoded), then the continuation is
printed token by token; generation stops at the tokenizer's EOS or after --max_new_tokens. BOS is
prepended when the tokenizer has one (training packs documents behind BOS). The prompt and the
new tokens must fit the checkpoint's max_position; --max_position raises it to extrapolate.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from dga_jax.checkpoint.orbax_io import attention_changes, load_model, parse_settings
from dga_jax.data.tokenizers import Tokenizer, load_tokenizer
from dga_jax.errors import ConfigError
from dga_jax.generate import stream
from dga_jax.generate.inputs import end_ids
from dga_jax.model.config import ATTENTION_KINDS
from dga_jax.ops.dga.config import SELECTIONS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dga_jax.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="directory written by save_model")
    p.add_argument("--tokenizer", required=True, help="'byte', a *.model or tokenizer.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max_position",
        type=_positive_int,
        help="positions the model may read; default: the checkpoint's (past it RoPE extrapolates)",
    )
    p.add_argument("--attention", choices=ATTENTION_KINDS, help="default: the checkpoint's")
    p.add_argument("--selection", choices=SELECTIONS, help="DGA selection; default: stored")
    p.add_argument(
        "--attention_settings",
        default="",
        help="the baselines' fields, e.g. start_size=4,recent_size=2000; default: stored",
    )
    return p.parse_args(argv)


def _positive_int(text: str) -> int:
    """argparse's type of --max_position: 0 was refused by the model config, naming no flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class TextStream:
    """Writes the text that token ids add after `context`, holding back an incomplete character.

    Each id is decoded behind the ids before it: decoded alone, a SentencePiece continuation
    loses its leading space ("▁brown" -> "brown"). Only the last `CONTEXT` ids are kept as
    context, so a token costs the same after a 32K-token prompt as after a short one.
    """

    CONTEXT = 16

    def __init__(
        self, tokenizer: Tokenizer, context: Sequence[int] = (), out: TextIO | None = None
    ):
        self.tokenizer, self.out = tokenizer, sys.stdout if out is None else out
        self._restart(list(context))

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.written):
            return
        self._write(text)
        if len(self.ids) > 2 * self.CONTEXT:
            self._restart(self.ids)

    def finish(self) -> None:
        """Writes whatever was held back, then a newline."""
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.written):
            self._write(text)
        self.out.write("\n")
        self.out.flush()

    def _restart(self, ids: list[int]) -> None:
        """Keeps the last CONTEXT of `ids`, all written, as the context of what follows."""
        self.ids = ids[-self.CONTEXT :]
        # A context cut inside a character decodes to U+FFFD there: the character's last bytes,
        # when they come, complete it, and it is written then.
        self.written = self.tokenizer.decode(self.ids).rstrip("\ufffd")

    def _write(self, text: str) -> None:
        self.out.write(text[len(self.written) :])
        self.out.flush()
        self.written = text


def fail(message: str) -> NoReturn:
    """Exits with status 1 and a message naming the problem (no traceback)."""
    sys.exit(f"python -m dga_jax.generate: error: {message}")


def main(argv: Sequence[str] | None = None) -> None:
    """Loads the checkpoint and tokenizer, then streams the continuation of --prompt."""
    args = parse_args(argv)
    try:
        _generate(args)
    except KeyboardInterrupt:  # Ctrl-C, loading or writing, ends as a shell command's: no traceback
        sys.stderr.write("python -m dga_jax.generate: interrupted\n")
        sys.exit(130)


def _generate(args: argparse.Namespace) -> None:
    """`main`'s work, on the parsed arguments."""
    if not os.path.isdir(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint!r} is not a directory")
    if not args.prompt:
        fail("--prompt is empty")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"--tokenizer {args.tokenizer!r} could not be loaded: {e}")
    try:
        settings = parse_settings(args.attention_settings, "--attention_settings")
        changes = attention_changes(
            args.checkpoint, args.attention, selection=args.selection, settings=settings
        )
        if args.max_position is not None:
            changes["max_position"] = args.max_position
        model = load_model(args.checkpoint, **changes)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = bos + tokenizer.encode(args.prompt)
    if not ids:  # a tokenizer without BOS may encode some text (whitespace) to nothing
        fail(f"--prompt {args.prompt!r} encodes to no tokens")
    positions = len(ids) + args.max_new_tokens - 1  # the last new token is not fed
    if not model.config.positions_fit(positions):
        fail(
            f"--prompt ({len(ids)} tokens) and --max_new_tokens {args.max_new_tokens} need "
            f"{positions} positions, past the model's max_position={model.config.max_position}: "
            "shorten --prompt, lower --max_new_tokens or pass --max_position to extrapolate "
            "knowingly"
        )
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        fail(f"tokenizer id {max(ids)} is outside the model's vocabulary of {vocab}")
    stops = list(end_ids(model.config, tokenizer.eos_id))
    eos = tokenizer.eos_id
    if eos is not None and eos >= vocab:
        fail(f"the tokenizer's EOS id {eos} is outside the model's vocabulary of {vocab}")
    try:
        steps = stream(
            model,
            [ids],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_tokens=stops,
            seed=args.seed,
        )
    except ValueError as e:
        fail(str(e))
    try:
        _write(tokenizer, ids, steps, stops)
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # ends the text cut short, before `main` says why
        raise


def _write(tokenizer: Tokenizer, ids: list[int], steps, stops: list[int]) -> None:
    """Echoes the prompt `ids`, then the text of the tokens `steps` yields, up to a stop."""
    # The prompt as the model reads it: the continuation is written behind exactly this text
    # (SentencePiece, for one, drops a trailing space the continuation's first piece carries).
    sys.stdout.write(tokenizer.decode(ids))
    text = TextStream(tokenizer, ids)
    for tokens in steps:
        if tokens[0] < 0 or tokens[0] in stops:
            break
        text.push(int(tokens[0]))
    text.finish()


if __name__ == "__main__":
    main()
