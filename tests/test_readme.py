"""The README works as written: its Python examples run, the names and commands it gives exist,
and the Makefile installs for each target what the README says."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pathlib
import re
import shlex
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
# A README block preceded by this line is not run, and says why (a checkpoint, a 7B model, ...).
NOT_RUN = re.compile(r"<!-- not run by tests: (.+) -->")
# The Use, model and generation examples: fewer run blocks means the extraction broke.
MIN_RUN_BLOCKS = 3
# `python -m MODULE ARGS`, ARGS up to a comment, a closing backtick or an unescaped line end.
COMMAND = re.compile(r"python -m ([\w.]+)((?:\\\n|[^`#\n\\])*)")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """Each ```python block of markdown `text` as (line of its first code line, code, the reason
    it is not run or None): the reason is a `<!-- not run by tests: ... -->` line right before
    the fence."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL):
        before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
        reason = NOT_RUN.fullmatch(before)
        line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((line, match.group(1), reason and reason.group(1)))
    return blocks


def block_params() -> list:
    """The README's runnable Python blocks as test cases (a not-run one says why in the README)."""
    return [
        pytest.param(line, code, id=f"line{line}")
        for line, code, reason in python_blocks(README)
        if reason is None
    ]


@pytest.mark.parametrize("line,code", block_params())
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    """Runs in a fresh namespace and an empty working directory; tracebacks name README lines."""
    monkeypatch.chdir(tmp_path)
    exec(compile("\n" * (line - 1) + code, str(ROOT / "README.md"), "exec"), {"__name__": "readme"})


def test_readme_runs_enough_blocks():
    ran = [code for _, code, reason in python_blocks(README) if reason is None]
    assert len(ran) >= MIN_RUN_BLOCKS, f"only {len(ran)} README Python blocks are run"


def test_not_run_marker_is_seen():
    text = "a\n<!-- not run by tests: needs ckpt/x -->\n```python\nx = 1\n```\n```python\ny\n```\n"
    assert python_blocks(text) == [(4, "x = 1\n", "needs ckpt/x"), (7, "y\n", None)]


def resolve(name: str) -> object:
    """Dotted `name` as a user reaches it: `import` its longest module prefix, then getattr each
    part from the top package (so a package attribute that hides a subpackage fails)."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        try:
            importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            break
    obj = importlib.import_module(parts[0])
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj


def dotted_names(text: str) -> set[str]:
    """The `dga_jax.x.y` names in `text` other than `python -m` module paths."""
    return set(re.findall(r"(?<!-m )\bdga_jax(?:\.\w+)+", text))


def test_readme_dotted_names_resolve():
    names = dotted_names(README)
    assert {"dga_jax.dga_attention", "dga_jax.checkpoint"} <= names
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (AttributeError, ImportError):
            missing.append(name)
    assert not missing, f"README names that do not resolve: {missing}"


def test_resolve_sees_the_function_hiding_the_subpackage():
    """`dga_jax.generate` is the function: the module's names are not reachable through it."""
    assert callable(resolve("dga_jax.generate"))
    with pytest.raises(AttributeError):
        resolve("dga_jax.generate.stream")


def commands(text: str) -> list[tuple[str, list[str]]]:
    """Each `python -m MODULE ...` in `text` as (MODULE, the names of its --flags)."""
    return [
        (module, [flag.split(".")[0] for flag in re.findall(r"(?<!\S)--(\w[\w.]*)", args)])
        for module, args in COMMAND.findall(text)
    ]


def module_source(module: str) -> str:
    """The source of a module, or of every file of a package."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"README runs python -m {module}, which is not importable"
    if spec.submodule_search_locations:
        files = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.py"))
    else:
        files = [pathlib.Path(spec.origin)]
    return "".join(path.read_text() for path in files)


def test_readme_commands_exist(monkeypatch):
    """Every `python -m X` module is importable from the repository root and defines the flags
    it is given (as argparse "--flag" or absl "flag" strings)."""
    monkeypatch.syspath_prepend(str(ROOT))
    found = commands(README)
    assert {"dga_jax.generate", "dga_jax.checkpoint.convert"} <= {m for m, _ in found}
    for module, flags in found:
        source = module_source(module)
        for flag in flags:
            assert f'"--{flag}"' in source or f'"{flag}"' in source, f"{module} has no --{flag}"


def test_commands_parse_continuations_and_comments():
    text = "python -m a.b --x 1 \\\n    --y=2  # not --z\n`python -m c --w`. then --v"
    assert commands(text) == [("a.b", ["x", "y"]), ("c", ["w"])]


def makefile_rules(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """target -> (its normal prerequisites, its recipe lines) for each rule of a Makefile."""
    rules, recipe = {}, None
    for line in text.splitlines():
        rule = re.match(r"([^\s#:=][^:=]*):(?!=)(.*)", line)
        if line.startswith("\t") and recipe is not None:
            recipe.append(line.strip())
        elif rule:
            recipe = []
            for target in rule.group(1).split():
                rules[target] = (rule.group(2).partition("|")[0].split(), recipe)
        else:
            recipe = None
    return rules


def recipe(rules: dict[str, tuple[list[str], list[str]]], file: str) -> list[str]:
    """The recipe that makes `file`: its own rule's, else a `%` pattern rule's with the stem in
    place of `$*`."""
    if file in rules:
        return rules[file][1]
    for target, (_, lines) in rules.items():
        head, percent, tail = target.partition("%")
        if percent and file.startswith(head) and file.endswith(tail):
            stem = file[len(head) : len(file) - len(tail)]
            return [line.replace("$*", stem) for line in lines]
    return []


def installs(target: str) -> list[str]:
    """The `pip install` lines of the rules that `target` depends on directly."""
    rules = makefile_rules(MAKEFILE)
    lines = [
        line
        for prerequisite in rules[target][0]
        for line in recipe(rules, prerequisite)
        if "pip install" in line
    ]
    assert lines, f"no pip install in the rules {target} depends on"
    return lines


def test_make_run_installs_no_extra():
    """The main job installs what training needs, not the test extra (torch, transformers)."""
    lines = installs("run")
    assert all("-e ." in line and "[" not in line for line in lines), lines


@pytest.mark.parametrize("target", ["test", "lint", "format"])
def test_make_test_installs_the_test_extra(target):
    assert any("[test]" in line for line in installs(target)), installs(target)


def test_readme_make_targets_exist():
    targets = set(re.findall(r"(?:^|`)make (\w+)", README, re.MULTILINE))
    assert {"run", "test"} <= targets
    assert targets <= set(makefile_rules(MAKEFILE)), targets - set(makefile_rules(MAKEFILE))


def test_license_is_an_spdx_expression():
    # setuptools >= 77 warns on every install about the `{ text = ... }` table form.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    build = " ".join(project["build-system"]["requires"])
    assert re.search(r"setuptools>=(\d+)", build) and int(re.search(r">=(\d+)", build)[1]) >= 77


DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
# `name(..., keyword=)` in prose: a keyword argument the README says `name` takes.
KEYWORD_MENTION = re.compile(r"`([\w.]+)\(\.\.\.,\s*(\w+)=")
# A repository file the README or docs/ name: dga_jax/ops/dga/{a,b}.py expands to both files.
# Only sources and documents: `train/...jsonl.zst` in the notes is SlimPajama's layout.
REPO_PATH = re.compile(
    r"(?<![\w/.])((?:dga_jax|train|configs|benchmarks|tests|colab|docs)/[\w./{},-]*"
    r"\.(?:py|md|ipynb|sh))\b"
)


def keyword_mentions(text: str) -> list[tuple[str, str]]:
    return KEYWORD_MENTION.findall(text)


def test_keyword_mentions_take_their_keyword():
    """`f(..., kw=)`: f resolves (a bare name as `dga_jax.f`, `Llama.x` as `dga_jax.Llama.x`)
    and has a parameter kw."""
    found = keyword_mentions(README)
    assert ("Llama.prefill", "lengths") in found
    wrong = []
    for name, keyword in found:
        qualified = name if name.startswith("dga_jax.") else f"dga_jax.{name}"
        try:
            parameters = inspect.signature(resolve(qualified)).parameters
        except (AttributeError, ImportError):
            wrong.append(f"{name}: not found as {qualified}")
            continue
        if keyword not in parameters:
            wrong.append(f"{name} has no {keyword}=")
    assert not wrong, wrong


def test_keyword_mentions_span_lines():
    text = "`dga_jax.dga_attention(...,\nlengths=)` and `Llama.prefill(..., lengths=)`, `f(x=)`"
    assert keyword_mentions(text) == [
        ("dga_jax.dga_attention", "lengths"),
        ("Llama.prefill", "lengths"),
    ]


def repo_paths(text: str) -> set[str]:
    """The repository paths `text` names, brace lists expanded, trailing punctuation dropped."""
    paths = set()
    for found in REPO_PATH.findall(text):
        found = found.rstrip(".,")
        head, brace, rest = found.partition("{")
        if brace:
            options, _, tail = rest.partition("}")
            paths.update(f"{head}{option}{tail}" for option in options.split(","))
        else:
            paths.add(found)
    return paths


def test_repo_paths_expand():
    text = "see dga_jax/ops/dga/pallas_gpu_{forward,backward}.py, and `train/resume.py`."
    expected = {"dga_jax/ops/dga/pallas_gpu_forward.py", "dga_jax/ops/dga/pallas_gpu_backward.py"}
    assert repo_paths(text) == expected | {"train/resume.py"}


@pytest.mark.parametrize("name", ["README.md", *DOCS])
def test_named_files_exist(name):
    text = README if name == "README.md" else DOCS[name]
    assert name != "README.md" or "dga_jax/ops/dga/capacity.py" in repo_paths(text)
    missing = sorted(path for path in repo_paths(text) if not (ROOT / path).exists())
    assert not missing, f"{name} names files that do not exist: {missing}"


@pytest.mark.parametrize("name", sorted(DOCS))
def test_docs_dotted_names_resolve(name):
    missing = []
    for dotted in sorted(dotted_names(DOCS[name])):
        try:
            resolve(dotted)
        except (AttributeError, ImportError):
            missing.append(dotted)
    assert not missing, f"docs/{name} names that do not resolve: {missing}"


def test_bucket_growths_are_the_ones_documented():
    from dga_jax.generate.inputs import GROWTHS

    assert set(re.findall(r'growth="(\w+)"', README)) == set(GROWTHS)


def readme_commands(module: str) -> list[list[str]]:
    """The argument lists of the README's `python -m module` command lines (bash blocks)."""
    blocks = "".join(re.findall(r"^```bash\n(.*?)^```$", README, re.MULTILINE | re.DOTALL))
    return [
        shlex.split(args.replace("\\\n", " "))
        for found, args in COMMAND.findall(blocks)
        if found == module
    ]


@pytest.mark.parametrize(
    "module, parse",
    [
        ("dga_jax.generate", "dga_jax.generate.__main__:parse_args"),
        ("dga_jax.eval", "dga_jax.eval.__main__:parse_args"),
        ("dga_jax.checkpoint.convert", "dga_jax.checkpoint.convert:_parser"),
    ],
)
def test_readme_command_lines_parse(module, parse):
    """Each command line is accepted by the module's own parser: its flags, their values and
    choices, its subcommand (argparse exits with 2 on any of them)."""
    source, _, function = parse.partition(":")
    parser = getattr(importlib.import_module(source), function)
    lines = readme_commands(module)
    assert lines, f"no python -m {module} in the README's bash blocks"
    for argv in lines:
        parser().parse_args(argv) if function == "_parser" else parser(argv)


def config_overrides(text: str) -> list[tuple[str, str]]:
    """Each `--config.KEY=VALUE` in `text` as (KEY, VALUE); VALUE "" where none is given."""
    return [
        (key, value.rstrip(","))
        for key, value in re.findall(r"--config\.([\w.]+)=([^\s`)]*)", text)
    ]


def test_config_overrides_are_found():
    text = "`--config.mesh.seq=P`, --config.train.profile_steps=10,12, `--config.x=`"
    expected = [("mesh.seq", "P"), ("train.profile_steps", "10,12"), ("x", "")]
    assert config_overrides(text) == expected


def has_key(config, key: str) -> bool:
    for part in key.split("."):
        if part not in config:
            return False
        config = config[part]
    return True


def test_readme_config_overrides_load():
    """Every `--config.KEY=VALUE` of the README is a key of the configs and, where the value is
    concrete, `python -m train --config=configs/tiny_dga.py` accepts it (flag parsing and the
    frozen config's checks). Placeholders (`key=value`, `seq=P`, no value) only name the key."""
    from absl import flags
    from ml_collections import config_flags

    from configs import base
    from train.config import from_config_dict

    found = config_overrides(README)
    assert ("model.overrides.dga.focal_ratio", "0.2") in found
    placeholders = [key for key, value in found if value in {"", "P", "value"}]
    assert not [key for key in placeholders if key != "key" and not has_key(base.get_config(), key)]
    config_file = f"--config={ROOT / 'configs' / 'tiny_dga.py'}"
    for key, value in found:
        if value in {"", "P", "value"}:
            continue
        argv = ["train", config_file, f"--config.{key}={value}"]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
        values(argv)
        from_config_dict(values.config)
