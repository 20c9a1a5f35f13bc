"""Configs are built by one checker (`dga_jax.strict`) that names each unknown key and wrong type,
and the library leaves process-wide state (absl's flags) to the entry points."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
from typing import Any

import pytest
from absl import flags

import dga_jax
from configs import tiny_dga
from dga_jax import strict
from dga_jax.data.pipeline import DataConfig, make_train_iterator
from dga_jax.errors import ConfigError, InputError, MissingInputError
from dga_jax.model.config import ModelConfig
from tests.data.conftest import record, write_jsonl_zst
from train.config import from_config_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 1
    ratio: float = 0.5


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = ""
    count: int = 0
    scale: float = 1.0
    flag: bool = False
    impl: str | None = None
    names: tuple[str, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    inner: Inner = Inner()


def test_values_of_the_field_types_build():
    values = {
        "name": "a",
        "count": 3,
        "scale": 2.5,
        "flag": True,
        "impl": "xla",
        "names": ("x", "y"),
        "extra": {"any": [1]},
        "inner": {"size": 4},
    }
    expected = Outer("a", 3, 2.5, True, "xla", ("x", "y"), {"any": [1]}, Inner(4, 0.5))
    assert strict.build(Outer, values, "x.") == expected
    assert strict.build(Outer, {}, "x.") == Outer()


def test_conversions():
    built = strict.build(Outer, {"scale": 2, "names": ["a", "b"], "impl": None}, "x.")
    assert built.scale == 2.0 and type(built.scale) is float  # an int is accepted for a float
    assert built.names == ("a", "b")  # a list becomes the tuple
    assert built.impl is None
    assert strict.build(Outer, {"inner": Inner(7)}, "x.").inner == Inner(7)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"nmae": "a"}, r"unknown config key\(s\) \['x\.nmae'\]"),
        ({"inner": {"sise": 2}}, r"unknown config key\(s\) \['x\.inner\.sise'\]"),
        ({"name": 3}, r"x\.name must be str, got int 3"),
        ({"count": "3"}, r"x\.count must be int, got str '3'"),
        ({"count": 2.5}, r"x\.count must be int, got float 2\.5"),
        ({"count": True}, r"x\.count must be int, got bool True"),
        ({"scale": False}, r"x\.scale must be float, got bool False"),
        ({"scale": "1e-3"}, r"x\.scale must be float, got str"),
        ({"flag": 1}, r"x\.flag must be bool, got int 1"),
        ({"count": None}, r"x\.count must be int, got NoneType None"),
        ({"impl": 3}, r"x\.impl must be str, got int 3"),
        ({"names": "ab"}, r"x\.names must be a tuple, got 'ab'"),
        ({"names": ["a", 1]}, r"x\.names must be str, got int 1"),
        ({"extra": [1]}, r"x\.extra must be a dict, got \[1\]"),
        ({"inner": 3}, r"x\.inner must be a dict, got 3"),
        ({"inner": {"size": "2"}}, r"x\.inner\.size must be int, got str '2'"),
    ],
)
def test_unknown_keys_and_wrong_types_are_named(values, match):
    with pytest.raises(ConfigError, match=match):
        strict.build(Outer, values, "x.")


def test_a_non_mapping_is_named():
    with pytest.raises(ConfigError, match=r"^x must be a dict, got \[1\]"):
        strict.build(Outer, [1], "x.")


def test_a_config_error_is_an_input_error():
    assert issubclass(ConfigError, InputError) and issubclass(InputError, ValueError)
    assert issubclass(MissingInputError, InputError)
    assert issubclass(MissingInputError, FileNotFoundError)


def test_one_checker_rejects_unknown_keys_everywhere():
    train = tiny_dga.get_config().to_dict()
    train["optim"]["lerning_rate"] = 1.0
    data = {"seq_len": 8, "global_batch_size": 2, "trian": "shards/"}
    cases = [
        (ModelConfig.from_dict, {"dga": {"gamma": 0.1}}, "model.dga.gamma"),
        (DataConfig.from_dict, data, "data.trian"),
        (from_config_dict, train, "config.optim.lerning_rate"),
    ]
    for build, values, key in cases:
        with pytest.raises(ConfigError) as error:
            build(values)
        assert type(error.value) is ConfigError
        assert str(error.value).startswith(f"unknown config key(s) ['{key}']; known: [")


def test_data_config_types_are_checked():
    with pytest.raises(ConfigError, match=r"data\.seq_len must be int, got str '8'"):
        DataConfig.from_dict({"seq_len": "8", "global_batch_size": 2})
    config = DataConfig.from_dict({"seq_len": 8, "global_batch_size": 2, "set_names": ["a"]})
    assert config.set_names == ("a",)


def unparsed(self) -> bool:
    return False


def test_workers_need_absl_flags_parsed_by_the_entry_point(tmp_path, monkeypatch):
    for split in ("train", "validation"):
        write_jsonl_zst(tmp_path / split / "0.jsonl.zst", [record("a few words")] * 4)
    config = DataConfig(
        seq_len=8,
        global_batch_size=2,
        train=str(tmp_path / "train"),
        validation=str(tmp_path / "validation"),
        num_workers=2,
    )
    monkeypatch.setattr(flags.FlagValues, "is_parsed", unparsed)
    iterator = make_train_iterator(config)
    with pytest.raises(RuntimeError, match=r"absl\.flags\.FLAGS\.mark_as_parsed\(\)"):
        next(iterator)
    iterator.close()


def test_the_library_never_marks_absl_flags_parsed():
    package = pathlib.Path(dga_jax.__file__).parent
    calls = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "mark_as_parsed"
    ]
    assert not calls
