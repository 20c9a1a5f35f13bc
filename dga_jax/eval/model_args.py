"""The dga_jax backend's `--model_args` values, as lm_eval's parser leaves them, read and
checked: batch size, max_gen_toks, mesh, and the arguments that must keep their text."""

from __future__ import annotations

from typing import Any

from dga_jax.ops.checks import is_int

# Strings that lm_eval's arg parser may have turned into numbers: `checkpoint=200` (an Orbax
# step folder) arrives as the int 200.
TEXT_ARGS = ("checkpoint", "tokenizer", "mesh")


def parse_batch_size(batch_size: int | str) -> int:
    """lm_eval's batch size (an int, or its CLI's string) as an int; "auto" is not supported."""
    try:
        return int(batch_size)
    except ValueError:
        raise ValueError(
            f"batch_size must be an integer for the dga_jax backend, got {batch_size!r}"
        ) from None


def parse_max_gen_toks(value: Any, name: str) -> int:
    """A number of new tokens: an int >= 1 (or its string), else a ValueError naming `name`."""
    try:
        count = int(value) if isinstance(value, str) or is_int(value) else 0
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return count


def parse_mesh(mesh: str) -> list[int]:
    """The `mesh` model_arg, "1x-1x1x1", as its four device counts."""
    try:
        return [int(n) for n in str(mesh).split("x")]
    except ValueError:
        raise ValueError(
            f"mesh must be data x fsdp x seq x tensor device counts like 1x-1x1x1, got {mesh!r}"
        ) from None


def text_args(arg_string: str) -> dict[str, str]:
    """The `TEXT_ARGS` of a `key=value,...` string as written (split as lm_eval splits it;
    surrounding quotes dropped as it drops them)."""
    pieces = (piece.split("=", 1) for piece in arg_string.split(",") if "=" in piece)
    values = {key.strip(): value.strip() for key, value in pieces}
    return {k: _unquoted(values[k]) for k in TEXT_ARGS if k in values}


def _unquoted(text: str) -> str:
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    return text[1:-1] if quoted else text
