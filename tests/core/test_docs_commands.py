"""The documentation's commands and code run as written.

Users copy commands from README.md, docs/*.md, benchmarks/README.md and the comment headers of configs/**/*.yaml and
sweeps/**/*.yaml. Every ``directpred SUBCOMMAND ...`` there (also as ``python -m directpred``, under ``torchrun -m
directpred`` and behind ``VAR=value`` prefixes; fenced bash/sh/console blocks, inline code, YAML comment lines) is
parsed by the real command-line parser (nothing runs); its ``--set`` overrides are applied to the config it names
(the default config otherwise) by the loader the command itself uses; every config or sweep file it names exists.
Every ``python`` block of README.md and docs/*.md compiles, every ``directpred`` name it uses resolves, and a block
that needs nothing from outside it runs. docs/results/** (committed run records) is not read.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import re
import shlex
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from conftest import REPO

from directpred.cli import build_parser
from directpred.config import DATA_PATH_KEYS, Config, ConfigError, load_config
from directpred.sweep import load_sweep
from directpred.theory.simulate import load_simulate_config

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
YAMLS = sorted([*(REPO / "configs").rglob("*.yaml"), *(REPO / "sweeps").rglob("*.yaml")])
SHELL_BLOCKS = {"bash", "sh", "shell", "console", ""}  # a bare ``` block holds commands or their output

# --set values that stand for the reader's own data or number: the key is still checked (a data path is replaced by
# an existing folder, anything else by the key's default value), only the value is not.
PLACEHOLDER_VALUES = {
    "PATH",
    "N",
    "...",
    "/data/imagenet",
    "/data/imagenet-shards",
    "data/proxy",  # made by `python -m directpred.data.proxy data/proxy` (configs/imagenet/proxy.yaml)
    "data/proxy-shards",  # made by `directpred shards data/proxy --out data/proxy-shards`
    "../shared/data/cifar10-jpeg.tar.gz",  # the CIFAR-10 mirror beside the project's clone
}
# Keys that stand for any key, in prose that explains --set itself.
PLACEHOLDER_KEYS = {"key", "section.key", "eval.KEY"}
# Positional arguments that name the reader's file rather than one of the repository's.
PLACEHOLDER_FILES = {"CONFIG", "BASE", "FILE"}

INVOCATION = re.compile(
    r"(?:^|\s)(?:directpred\s+[a-z]|python3? -m directpred[\s.]|python3? benchmarks/\w+\.py\b"
    r"|torchrun .*-m directpred\s)"
)
INLINE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
API_NAME = re.compile(r"(?<![\w/.-])directpred(?:\.[A-Za-z_]\w*)+(?![\w/-])(?<!\.py)(?<!\.yaml)(?<!\.md)")
COMMENT_COMMAND = re.compile(r"^\s*(?:[A-Za-z_]\w*=\S*\s+)*(?:directpred|python3?|torchrun|srun)\s")
CONFIG_FILE = re.compile(r"^(?:configs|sweeps)/[\w./-]+\.ya?ml$")


@dataclass(frozen=True)
class DocCommand:
    """One ``directpred`` command of the documentation."""

    where: str  # file:line of its first line
    text: str  # the words after ``directpred``, as written (continuation lines joined, brackets kept)
    argv: tuple[str, ...]  # the arguments after ``directpred``
    synopsis: bool  # a usage line (``[--out DIR]``, ``a|b``, ``...``) or a mention in prose: names only
    program: str  # directpred; a module directpred.x.y (python -m); a script benchmarks/x.py

    @property
    def head(self) -> str:
        """The program as typed: ``directpred``, ``python -m directpred.x``, ``python benchmarks/x.py``."""
        if self.program == "directpred":
            return "directpred"
        return f"python {self.program}" if self.program.endswith(".py") else f"python -m {self.program}"

    def __str__(self) -> str:
        return f"{self.where}: {self.head} {self.text}"


# ----------------------------------------------------------------------------------------------------------------
# Extraction


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines joined over trailing backslashes, each with the number of its first line."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for lineno, line in lines:
        if pending is not None:
            lineno, line = pending[0], pending[1] + " " + line.strip()
        if line.rstrip().endswith("\\"):
            pending = (lineno, line.rstrip()[:-1].rstrip())
            continue
        pending = None
        out.append((lineno, line))
    if pending is not None:
        out.append(pending)
    return out


def _array_definitions(block: list[tuple[int, str]]) -> dict[str, list[list[str]]]:
    """Bash arrays assigned in a block (``ARGS=(a b c)``, over several lines): name -> each assignment's words."""
    text = "\n".join(line for _, line in block)
    arrays: dict[str, list[list[str]]] = {}
    for name, body in re.findall(r"\b(\w+)=\(([^)]*)\)", text):
        arrays.setdefault(name, []).append(shlex.split(body.replace("\\\n", " "), comments=True))
    return arrays


def _commands_in(
    where: Path, lineno: int, text: str, *, mention: bool, arrays: dict[str, list[list[str]]] | None = None
) -> list[DocCommand]:
    """The directpred commands of one logical shell line (``a && b`` holds two); ``mention``: inline code in prose,
    where ``directpred train`` alone names the command rather than runs it."""
    text = text.strip().removeprefix("$ ")
    if not INVOCATION.search(" " + text):
        return []
    label = f"{where.relative_to(REPO) if where.is_relative_to(REPO) else where.name}:{lineno}"
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as exc:  # an unclosed quote: the reader's shell would choke on it too
        return [DocCommand(label, text, (f"<cannot split: {exc}>",), False, "directpred")]
    segments: list[list[str]] = [[]]
    for tok in tokens:
        if tok in {"&&", "||", ";", "|"}:
            segments.append([])
        else:
            segments[-1].append(tok)
    commands = []
    for seg in segments:
        found = _invocation(seg)
        if found is None:
            continue
        program, argv = found
        for expanded in _expand_arrays(argv, arrays or {}):
            words = [_unbracket(w) for w in expanded]
            synopsis = any(w == "..." or ("|" in w and "=" not in w) or w != v for w, v in zip(words, expanded))
            words = [w for w in words if w not in ("...", "")]
            if mention and (len(words) <= 1 + (words[:1] == ["theory"]) or words[-1].startswith("-")):
                synopsis = True  # `directpred train`, `directpred train --resume`: names a command or an option
            commands.append(DocCommand(label, " ".join(expanded), tuple(words), synopsis, program))
    return commands


def _unbracket(word: str) -> str:
    """A word of a usage line without its brackets (``[--out``, ``RUN_DIR]``, ``[--force]``); a value's own
    brackets stay (``log.backends=[tensorboard, wandb]``)."""
    if word.startswith("[") and (word.count("[") > word.count("]") or (word.endswith("]") and "=" not in word)):
        word = word[1:]
    if word.endswith("]") and word.count("]") > word.count("["):
        word = word[:-1]
    return word


def _invocation(seg: list[str]) -> tuple[str, list[str]] | None:
    """(program, its arguments) of one simple command: ``directpred``, a module ``directpred.x.y`` (``python -m``)
    or a script ``benchmarks/x.py``; None if it runs something else."""
    i = 0
    while i < len(seg) and (re.match(r"^[A-Za-z_]\w*=", seg[i]) or seg[i] in {"srun", "time", "exec", "nohup"}):
        i += 1  # VAR=value prefixes and launchers
    if i >= len(seg):
        return None
    if seg[i] == "directpred":
        return "directpred", seg[i + 1 :]
    if re.fullmatch(r"python3?", seg[i]) and seg[i + 1 : i + 2] == ["-m"] and i + 2 < len(seg):
        module = seg[i + 2]
        return (module, seg[i + 3 :]) if module.split(".")[0] == "directpred" else None
    if re.fullmatch(r"python3?", seg[i]) and i + 1 < len(seg) and re.fullmatch(r"benchmarks/\w+\.py", seg[i + 1]):
        return seg[i + 1], seg[i + 2 :]
    if seg[i] == "torchrun" and "-m" in seg[i:]:
        m = seg.index("-m", i)
        return ("directpred", seg[m + 2 :]) if seg[m + 1 : m + 2] == ["directpred"] else None
    return None


def _expand_arrays(argv: list[str], arrays: dict[str, list[list[str]]]) -> list[list[str]]:
    """``"${ARGS[@]}"`` replaced by each assignment of ARGS in the block (one command per assignment)."""
    for i, word in enumerate(argv):
        m = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
        if m:
            assert m.group(1) in arrays, f"{' '.join(argv)}: ${{{m.group(1)}[@]}} is assigned nowhere in its block"
            return [
                out
                for words in arrays[m.group(1)]
                for out in _expand_arrays([*argv[:i], *words, *argv[i + 1 :]], arrays)
            ]
    return [argv]


def _markdown_parts(path: Path) -> tuple[list[tuple[int, str, list[tuple[int, str]]]], list[tuple[int, str]]]:
    """(fenced blocks as (first line, language, numbered lines), numbered prose lines) of a markdown file."""
    blocks: list[tuple[int, str, list[tuple[int, str]]]] = []
    prose: list[tuple[int, str]] = []
    current: tuple[int, str, list[tuple[int, str]]] | None = None
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and current is None:
            current = (lineno, m.group(2), [])
        elif m and not m.group(2) and current is not None:
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append((lineno, line))
        else:
            prose.append((lineno, line))
    assert current is None, f"{path.relative_to(REPO)}:{current[0]}: unclosed ``` block"
    return blocks, prose


def _prompt_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The ``$ `` lines of a console session and their continuation lines (not the output)."""
    kept: list[tuple[int, str]] = []
    for n, line in lines:
        if line.lstrip().startswith("$ ") or (kept and kept[-1][0] == n - 1 and kept[-1][1].rstrip().endswith("\\")):
            kept.append((n, line))
    return kept


def _inline_commands(path: Path, lines: list[tuple[int, str]]) -> list[DocCommand]:
    return [
        cmd
        for lineno, line in lines
        for span in INLINE.findall(line)
        for cmd in _commands_in(path, lineno, span, mention=True)
    ]


def _doc_commands(path: Path) -> list[DocCommand]:
    blocks, prose = _markdown_parts(path)
    commands = _inline_commands(path, prose)
    for _, lang, lines in blocks:
        if lang not in SHELL_BLOCKS:
            continue
        if any(line.lstrip().startswith("$ ") for _, line in lines):  # a console session: only the prompts
            lines = _prompt_lines(lines)
        arrays = _array_definitions(lines)
        for lineno, line in _logical_lines(lines):
            commands += _commands_in(path, lineno, line, mention=False, arrays=arrays)
    return commands


def _yaml_commands(path: Path) -> list[DocCommand]:
    """Commands on the comment lines of a YAML file (``#   directpred ...``, ``# Command:  directpred ...``) and in
    their inline code."""
    lines = enumerate(path.read_text().splitlines(), 1)
    comments = [(n, line.lstrip()[1:]) for n, line in lines if line.lstrip().startswith("#")]
    commands = []
    for lineno, text in _logical_lines(comments):
        text = re.sub(r"^\s*Command:\s*", "", text)
        if COMMENT_COMMAND.match(text):
            commands += _commands_in(path, lineno, text, mention=False)
        else:
            commands += _inline_commands(path, [(lineno, text)])
    return commands


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _help_commands() -> list[DocCommand]:
    """The examples of every ``--help`` (the parsers' epilogs), named ``directpred SUBCOMMAND --help:N``."""
    commands = []
    stack = [build_parser()]
    while stack:
        parser = stack.pop()
        sub = _subparsers(parser)
        stack += list(sub.choices.values()) if sub is not None else []
        for n, line in enumerate((parser.epilog or "").splitlines(), 1):
            for cmd in _commands_in(REPO, n, line, mention=False):
                commands.append(dataclasses.replace(cmd, where=f"{parser.prog} --help:{n}"))
    return commands


def _all_commands() -> list[DocCommand]:
    return (
        [cmd for path in DOCS for cmd in _doc_commands(path)]
        + [cmd for path in YAMLS for cmd in _yaml_commands(path)]
        + _help_commands()
    )


COMMANDS = _all_commands()


def _inline_sets() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        _, prose = _markdown_parts(path)
        for lineno, line in prose:
            for span in INLINE.findall(line):
                if span.startswith("--set ") and not INVOCATION.search(" " + span):
                    out.append((f"{path.relative_to(REPO)}:{lineno}", span))
    return out


INLINE_SETS = _inline_sets()


# ----------------------------------------------------------------------------------------------------------------
# Checks


def _check_names(parser: argparse.ArgumentParser, argv: tuple[str, ...], prog: str = "directpred") -> list[str]:
    """Every subcommand and every option of ``argv`` exists, spelled in full (argparse would also take an
    abbreviation, ``--no-lin``, which breaks as soon as another option shares the prefix)."""
    errors: list[str] = []
    path, i = [prog], 0
    while i < len(argv):
        word = argv[i]
        sub = _subparsers(parser)
        if word.startswith("-") and not re.fullmatch(r"-[\d.]+", word):
            flag = word.split("=", 1)[0]
            action = parser._option_string_actions.get(flag)
            if action is None:
                errors.append(f"`{' '.join(path)}` has no option {flag}")
            elif action.nargs in (None, "?") and "=" not in word:
                i += 1  # its value
            elif action.nargs in ("+", "*"):
                while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    i += 1
        elif sub is not None:  # the (sub)subcommand; a usage line may give alternatives, a|b|c
            unknown = [name for name in word.split("|") if name not in sub.choices]
            if unknown:
                errors.append(f"`{' '.join(path)}` has no subcommand {unknown[0]!r} (it has {', '.join(sub.choices)})")
                return errors
            parser, path = sub.choices[word.split("|")[0]], [*path, word.split("|")[0]]
        i += 1
    return errors


class _GotParser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _script_parser(program: str) -> argparse.ArgumentParser:
    """The argparse parser that ``main()`` of a module (``directpred.data.proxy``) or script (``benchmarks/x.py``)
    builds: main() runs until its first ``parse_args`` call, which stops it."""
    if program.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_docs_{Path(program).stem}", REPO / program)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(program)

    def stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        raise _GotParser(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), mock.patch.object(sys, "argv", [program]):
        try:
            module.main()
        except _GotParser as got:
            return got.parser
    raise AssertionError(f"{program}: main() parsed no arguments")


def _parse(parser: argparse.ArgumentParser, argv: tuple[str, ...]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with argparse's error message in the AssertionError instead of an exit."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(list(argv))
        except SystemExit:
            pass
    raise AssertionError(err.getvalue().strip().splitlines()[-1])


def _sets(argv: tuple[str, ...]) -> list[str]:
    """The ``--set`` values of ``argv`` (also of a usage line, which is not parsed as a whole)."""
    out = []
    for i, word in enumerate(argv):
        if word == "--set" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif word.startswith("--set="):
            out.append(word.split("=", 1)[1])
    return [s for s in out if s != "KEY=VALUE"]


def _default_of(key: str) -> Any:
    """The default value of a dotted config key, or a string no key accepts if there is no such key."""
    node: Any = Config()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return "<no such key>"
        node = getattr(node, part)
    return node


def _resolved(sets: list[str], data_dir: Path) -> list[str]:
    """``sets`` with the placeholder values of :data:`PLACEHOLDER_VALUES` replaced (the keys stay)."""
    out = []
    for text in sets:
        key, _, value = text.partition("=")
        if value in PLACEHOLDER_VALUES:
            if key.startswith("data.") and key.split(".", 1)[1] in DATA_PATH_KEYS:
                value = str(data_dir)
            else:
                value = _yaml_text(_default_of(key))
        out.append(f"{key}={value}")
    return out


def _yaml_text(value: Any) -> str:
    """``value`` as a --set value (YAML flow style: ``[tensorboard]``, ``0.3``, ``false``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _file(name: str | None) -> Path | None:
    """A config or sweep file named by a command (relative to the repository), None for a placeholder."""
    if name is None or name in PLACEHOLDER_FILES:
        return None
    return REPO / name


def _apply_sets(cmd: DocCommand, args: argparse.Namespace | None, data_dir: Path) -> None:
    """Apply the command's ``--set`` overrides with the loader the command uses (raises ConfigError). A file's own
    ``data.path`` that is missing here (the CIFAR-10 mirror beside the clone) is the reader's data, not an error of
    the command: then the command is checked again with ``data.path`` at an existing folder."""
    sets = _resolved(_sets(cmd.argv), data_dir)
    _with_reader_data(lambda extra: _load(cmd, args, [*sets, *extra]), sets, data_dir)


def _with_reader_data(load: Any, sets: list[str], data_dir: Path) -> Any:
    """``load([])``, or ``load(["data.path=DATA_DIR"])`` if the file's own ``data.path`` is missing here and
    ``sets`` gives none."""
    try:
        return load([])
    except ConfigError as exc:
        given = any(s.startswith("data.path=") for s in sets)
        if given or not re.search(r"data\.path='[^']*' is not allowed: the path does not exist", str(exc)):
            raise
        return load([f"data.path={data_dir}"])


def _load(cmd: DocCommand, args: argparse.Namespace | None, sets: list[str]) -> None:
    if cmd.program != "directpred":  # a script's --set overrides its --config, or the defaults
        if sets:
            load_config(_file(getattr(args, "config", None)), sets)
        return
    if not cmd.argv:  # `python -m directpred ...`: the program's name
        return
    command = cmd.argv[0]
    if command == "theory":
        if args is not None and args.theory_command == "simulate":
            load_simulate_config(REPO / args.config, sets)
        return
    if command == "sweep":
        if args is not None and _file(args.file) is not None:
            load_sweep(_file(args.file), sets)  # type: ignore[arg-type]
        elif sets:
            load_config(None, sets)
        return
    if not sets:
        return
    config = _file(args.config) if args is not None and command == "train" else None
    load_config(config, sets)  # eval and train --resume: against the defaults (the run's config is not known)


def test_commands_are_found():
    """The extraction finds what the documentation holds (a broken extractor would make every test vacuous)."""
    texts = [c.text for c in COMMANDS]
    wheres = {c.where.split(":")[0] for c in COMMANDS}
    assert "train configs/cpu/quickstart.yaml --out runs/qs" in texts  # after `pip install ... &&`
    assert {"README.md", "docs/imagenet.md", "docs/theory.md", "configs/cpu/quickstart.yaml"} <= wheres
    assert any(c.where.startswith("sweeps/") for c in COMMANDS)
    assert any(c.text.startswith("train configs/imagenet/byol_directpred_300ep.yaml --set data.path") for c in COMMANDS)
    # the Slurm script's "${ARGS[@]}" gives a start and a resume command
    assert sum(c.where.startswith("docs/imagenet.md") and "--resume $RUN" in c.text for c in COMMANDS) == 1
    assert sum(c.where.startswith("directpred sweep --help:") for c in COMMANDS) == 3
    assert len([c for c in COMMANDS if not c.synopsis]) >= 60
    assert sum(len(_sets(c.argv)) for c in COMMANDS) >= 20


def _problem(cmd: DocCommand, data_dir: Path) -> str | None:
    """What is wrong with a documented command (None: nothing): an unknown subcommand or option, an argparse error,
    a config or sweep file that does not exist, or an override its config refuses."""
    if cmd.program == "directpred":
        parser = build_parser()
    elif cmd.program.endswith(".py") and not (REPO / cmd.program).is_file():
        return f"no such script: {cmd.program}"
    else:
        parser = _script_parser(cmd.program)
    errors = _check_names(parser, cmd.argv, cmd.head)
    if errors:
        return "; ".join(errors)
    args = None
    if not cmd.synopsis:
        try:
            args = _parse(parser, cmd.argv)
        except AssertionError as exc:
            return str(exc)
    missing = [w for w in cmd.argv if CONFIG_FILE.match(w) and not (REPO / w).is_file()]
    if missing:
        return f"no such file: {', '.join(missing)}"
    try:
        _apply_sets(cmd, args, data_dir)
    except ConfigError as exc:
        return f"config error: {exc}"
    return None


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_command_parses(cmd, tmp_path):
    """The command's subcommand and options exist, it parses as written, its --set overrides are accepted by the
    config it runs with, and every config or sweep file it names exists."""
    problem = _problem(cmd, tmp_path)
    assert problem is None, f"{cmd}\n  {problem}"


def test_a_wrong_command_is_reported(tmp_path):
    """Planted errors in a page are found, each named with its file:line (so a passing run means something)."""
    page = tmp_path / "page.md"
    page.write_text(
        "Run `directpred eval runs/qs --no-lin` or `directpred evaluate runs/qs`.\n\n"
        "```console\n"
        "$ OMP_NUM_THREADS=1 python -m directpred train configs/cpu/quickstart.yaml \\\n"
        "    --set predictor.rh=0.5 --out runs/x   # a comment\n"
        "directpred train: output, not a command --bogus\n"
        "```\n"
        "```bash\n"
        "torchrun --nproc_per_node=2 -m directpred sweep sweeps/cpu/nothing.yaml --out runs/s\n"
        "pip install -e . && directpred train configs/cpu/quickstart.yaml --set train.epochs=two\n"
        "directpred train configs/cpu/quickstart.yaml --set data.path=PATH --set train.epochs=2\n"
        "python benchmarks/throughput.py --confg configs/cpu/quickstart.yaml\n"
        "python -m directpred.data.proxy data --train 3000 --val\n"
        "```\n"
    )
    found = {f"{c.where} {c.argv[0]}": _problem(c, tmp_path) for c in _doc_commands(page)}
    assert found == {
        "page.md:1 eval": "`directpred eval` has no option --no-lin",
        "page.md:1 evaluate": "`directpred` has no subcommand 'evaluate' (it has train, eval, export, embed, shards, "
        "sweep, theory, plot, diagnose)",
        "page.md:4 train": "config error: unknown config key 'predictor.rh'. Did you mean 'predictor.rho'? Allowed "
        "keys here: " + ", ".join(f.name for f in dataclasses.fields(Config().predictor)),
        "page.md:9 sweep": "no such file: sweeps/cpu/nothing.yaml",
        "page.md:10 train": "config error: train.epochs: 'two' has the wrong type; expected int",
        "page.md:11 train": None,  # a placeholder data path; the key is still checked
        "page.md:12 --confg": "`python benchmarks/throughput.py` has no option --confg",
        "page.md:13 data": "directpred.data.proxy: error: argument --val: expected one argument",
    }


def test_every_config_and_sweep_file_gives_its_command():
    """Each shipped config and sweep file names its own command in its comments, so test_command_parses loads every
    sweep file (with load_sweep, every cell's config validated) and every config with that command."""
    without = [
        str(path.relative_to(REPO))
        for path in YAMLS
        if not any(str(path.relative_to(REPO)) in c.argv for c in _yaml_commands(path) if not c.synopsis)
    ]
    assert without == []


@pytest.mark.parametrize("span", INLINE_SETS, ids=[w for w, _ in INLINE_SETS])
def test_inline_set_mentions(span, tmp_path):
    """``--set key=value`` written alone in prose (not in a command): the key exists and the value is accepted by
    the default config (placeholders as in commands)."""
    where, text = span
    sets = [s for s in _sets(tuple(shlex.split(text))) if s.split("=", 1)[0] not in PLACEHOLDER_KEYS]
    try:
        if where.startswith("docs/theory.md:"):  # `directpred theory simulate`'s keys, of the file the line names
            line = (REPO / "docs" / "theory.md").read_text().splitlines()[int(where.split(":")[1]) - 1]
            named = re.findall(r"(\w+\.yaml)", line)
            load_simulate_config(REPO / "configs" / "theory" / (named[0] if named else "linear.yaml"), sets)
        else:
            load_config(None, _resolved(sets, tmp_path))
    except ConfigError as exc:
        raise AssertionError(f"{where}: {text}\n  config error: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# Python blocks


def _python_blocks() -> list[tuple[str, str]]:
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks, _ = _markdown_parts(path)
        for lineno, lang, lines in blocks:
            if lang == "python":
                out.append((f"{path.relative_to(REPO)}:{lineno}", "\n".join(line for _, line in lines)))
    return out


PYTHON_BLOCKS = _python_blocks()


def _resolve(dotted: str) -> None:
    """Look up ``a.b.c``: attributes, or submodules that their package does not import itself."""
    parts = dotted.split(".")
    obj: Any = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if isinstance(obj, types.ModuleType):
            try:
                obj = importlib.import_module(".".join(parts[: i + 1]))
                continue
            except ModuleNotFoundError as exc:
                if exc.name != ".".join(parts[: i + 1]):
                    raise
        raise AttributeError(f"{'.'.join(parts[:i])} has no attribute {part!r}")


def _unresolved(tree: ast.AST) -> list[str]:
    """The directpred names of a block that do not exist, each with the reason."""
    out = []
    for name in _directpred_names(tree):
        try:
            _resolve(name)
        except (ModuleNotFoundError, AttributeError) as exc:
            out.append(f"{name} ({exc})")
    return out


def _directpred_names(tree: ast.AST) -> list[str]:
    """Every ``directpred...`` name the code uses: imported ones, and attribute chains on an imported module."""
    names, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "directpred":
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "directpred":
                    names.append(a.name)
                    modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # a whole chain a.b.c, not also a.b
            chain: list[str] = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                chain.insert(0, cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in modules:
                names.append(".".join([modules[cur.id], *chain]))
    return sorted(set(names))


def _free_names(tree: ast.AST) -> set[str]:
    """Names a block reads but neither assigns nor imports (``loader``, ``images``): it needs the reader's code."""
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound


def test_python_blocks_are_found():
    assert len(PYTHON_BLOCKS) >= 3
    assert sum(not _free_names(ast.parse(code)) for _, code in PYTHON_BLOCKS) >= 1  # at least one block runs


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_python_block(where, code, tmp_path, monkeypatch):
    """The block compiles and every directpred name it uses exists; a self-contained block runs."""
    tree = ast.parse(compile(code, where, "exec", ast.PyCF_ONLY_AST))
    compile(tree, where, "exec")
    unresolved = _unresolved(tree)
    assert not unresolved, f"{where}: {', '.join(unresolved)}"
    if not _free_names(tree):
        monkeypatch.chdir(tmp_path)
        exec(compile(tree, where, "exec"), {"__name__": "__doc_block__"})


def test_a_wrong_python_name_is_reported():
    code = (
        "import directpred\nimport directpred.heads as heads\nfrom directpred.losses import two_view_loss, nothing\n"
        "net = directpred.load_backbone('x')\nheads.DirectPred(8)\ndirectpred.heads.nope.x\n"
        "from directpred.theory.plot import fig3\n"
    )
    assert _unresolved(ast.parse(code)) == [
        "directpred.heads.nope.x (directpred.heads has no attribute 'nope')",
        "directpred.losses.nothing (directpred.losses has no attribute 'nothing')",
        "directpred.theory.plot.fig3 (directpred.theory has no attribute 'plot')",
    ]


def test_inline_api_names_resolve():
    """``directpred.x.y`` names in the prose of README.md and docs/*.md (inline code) exist."""
    unresolved = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        _, prose = _markdown_parts(path)
        for lineno, line in prose:
            for span in INLINE.findall(line):
                for name in API_NAME.findall(span):
                    try:
                        _resolve(name)
                    except (ModuleNotFoundError, AttributeError) as exc:
                        unresolved.append(f"{path.relative_to(REPO)}:{lineno}: {name} ({exc})")
    assert not unresolved, "\n".join(unresolved)
