"""Every value out of range is refused, exit 2, one line, nothing changed (#14).

The class: a number or name a command reads (retention counts, sizes, entry
numbers, folders) is parsed and range-checked once, as the command line is
read (``vml/values.py``, ``vml/cli/params.py``).  The test walks every
command of the typer app: no parameter may be a bare ``int`` or ``float``,
and each checked parameter is given bad values, which must exit 2 with one
line and leave every file as it was.  ``--keep-last -1`` once removed entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main
from hypothesis import given
from hypothesis import strategies as st
from typer._click import types as click_types
from typer.testing import CliRunner

from tests.conftest import make_area
from tests.reliability.helpers import snapshot
from vml.cli.params import Count, EntryName, Folder, Memory, Seconds, Size
from vml.cli.root import app
from vml.errors import UsageError
from vml.plumbing.retention import Policy
from vml.values import (
    MAX_COUNT,
    MAX_ENTRY,
    MAX_MEMORY_MIB,
    MAX_SECONDS,
    entry_number,
    parse_count,
    parse_memory_mib,
    parse_seconds,
    parse_size,
)

runner = CliRunner()
HUGE = "9" * 5000  # int() of it raises ValueError (Python's digit limit): once a traceback

BAD: dict[type, list[str]] = {
    Count: ["-1", "0", "1e999", HUGE, "99999999999999999999", str(MAX_COUNT + 1), "abc", "",
            " ", "1.5", "+3", "\u0663", "1_000", "0x10"],
    Size: ["-1", "0", "1e999", "99999999999999999999G", HUGE, "", "abc", "nan", "inf", "1.5M",
           "-1M", "4X", "2P", "1 M B"],
    EntryName: ["E0", "e0", "E" + HUGE, "E99999999999999999999", "", "   "],
    Folder: ["", "  ", "\t"],
    Memory: ["-1", "0", "1e999", "1.5G", "1000K", "99999999999999999999G", HUGE, "", "abc"],
    Seconds: ["-1", "0", "0.0", "1e999", "inf", "nan", "86401", "", "abc", "1,5"],
}  # fmt: skip
CHECKED = tuple(BAD)


@dataclass
class Param:
    command: str  # "remote add" for subcommands
    name: str
    opts: list[str]
    is_option: bool
    kind: type


def params() -> list[Param]:
    """Every parameter of every command."""
    found: list[Param] = []

    def walk(cmd: object, prefix: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{prefix}{name} ")
        for p in getattr(cmd, "params", []) if prefix else []:
            is_option = getattr(p, "param_type_name", "") == "option"
            found.append(Param(prefix.strip(), p.name, list(p.opts), is_option, type(p.type)))

    walk(typer.main.get_command(app), "")
    return found


def test_no_command_reads_a_number_without_checking_it() -> None:
    numeric = (click_types.IntParamType, click_types.FloatParamType, click_types.IntRange)
    raw = [f"{p.command} {p.opts}" for p in params() if issubclass(p.kind, numeric)]
    assert raw == []
    # The walk below sees the kinds of parameter it is meant to.
    kinds = {p.kind for p in params()}
    assert set(CHECKED) <= kinds


# How to run each command with a checked parameter; {name} stands for an argument.
TEMPLATES = {
    "init": ["init", "{path}"],
    "commit": ["commit", "{area}"],
    "checkout": ["checkout", "{entry}", "{area}"],
    "restore": ["restore", "{entry}", "{area}"],
    "demo": ["demo", "{folder}"],
    "show": ["show", "{entry}"],
    "log": ["log"],
    "status": ["status", "{area}"],
    "branch": ["branch", "new-branch", "{entry}"],
    "tag": ["tag", "new-tag", "{entry}"],
    "rm": ["rm", "{entries}"],
    "convert": ["convert", "{entry}", "--to", "differential"],
    "prune": ["prune"],
    "verify": ["verify", "{entries}"],
    "clone": ["clone", "{repo}", "{path}"],
    "fetch": ["fetch", "origin", "{entries}"],
    "push": ["push", "origin", "{entries}"],
    "vm init": ["vm", "init", "{area}", "--disk", "disk.img"],
    "run": ["run", "{area}", "--dry-run"],
    "stop": ["stop", "{area}"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("values")
    make_area(base / "area", disk=256 << 10)
    for args in (["init", base / "repo", "--block-size", "64K"], ["commit", base / "area", "-q"]):
        assert runner.invoke(app, ["-R", str(base / "repo"), *map(str, args)]).exit_code == 0
    return base


def invocation(base: Path, p: Param, bad: str) -> list[str]:
    valid = {
        "entry": "E1",
        "entries": "E1",
        "area": str(base / "area"),
        "path": str(base / "new"),
        "folder": str(base / "new"),
        "repo": str(base / "repo"),
    }
    if not p.is_option:
        valid[p.name] = bad
    args = [a.format(**valid) for a in TEMPLATES[p.command]]
    return ["-R", str(base / "repo"), *args, *([p.opts[0], bad] if p.is_option else [])]


def test_every_checked_parameter_refuses_bad_values_with_exit_2(world: Path) -> None:
    checked = [p for p in params() if issubclass(p.kind, CHECKED)]
    assert {p.command for p in checked} == set(TEMPLATES), "a template for each such command"
    before = snapshot(world)
    for p in checked:
        for bad in BAD[p.kind]:
            args = invocation(world, p, bad)
            assert not p.is_option or p.opts[0] in args
            res = runner.invoke(app, args)
            where = f"vml {' '.join(args[2:])[:80]}"
            assert res.exit_code == 2, (where, res.output, res.exception)
            lines = res.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("vml: "), (where, res.stderr)
            assert len(lines[0]) < 300, where  # a 5000-digit value is not repeated whole
            assert res.stdout == "", where
            assert snapshot(world) == before, where


def test_each_command_reads_its_template_with_good_values(world: Path) -> None:
    """The templates are right: with good values the command line parses (nothing runs)."""
    root = typer.main.get_command(app)
    for p in [p for p in params() if issubclass(p.kind, CHECKED)]:
        good = {
            Count: "3",
            Size: "64K",
            EntryName: "E1",
            Folder: str(world / "area"),
            Memory: "512M",
            Seconds: "2.5",
        }[p.kind]
        args = invocation(world, p, good)[2:]
        cmd = root
        for word in p.command.split():
            assert args.pop(0) == word
            cmd = cmd.commands[word]  # type: ignore[attr-defined]
        ctx = cmd.make_context(p.command, args)
        assert ctx.params[p.name] not in (None, [], ()), p


def test_negative_retention_counts_never_reach_the_policy() -> None:
    with pytest.raises(UsageError, match="--keep-last"):
        Policy(last=-1)
    with pytest.raises(UsageError, match="--keep-daily"):
        Policy(daily=MAX_COUNT + 1)
    assert Policy(last=0).empty()


@pytest.mark.parametrize(
    ("text", "value"),
    [("1M", 1 << 20), ("256K", 256 << 10), ("1MiB", 1 << 20), ("4gb", 4 << 30), (" 4096 ", 4096)],
)
def test_sizes_people_write(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_entry_numbers_in_and_out_of_range() -> None:
    assert entry_number("E7") == entry_number("e7") == entry_number("7") == 7
    assert entry_number("tag-7") is None and entry_number("abcd") is None
    assert entry_number(str(MAX_ENTRY)) == MAX_ENTRY
    assert entry_number("0000") is None  # bare digits may be a commit id prefix
    assert entry_number(HUGE) is None
    for bad in ("E0", f"E{MAX_ENTRY + 1}", "E" + HUGE):
        with pytest.raises(UsageError, match="out of range"):
            entry_number(bad)


@given(st.text(max_size=30) | st.from_regex(r"[Ee+-]?[0-9]{1,40}[KMGTkmgt]?(i?b)?", fullmatch=True))
def test_the_parsers_return_a_value_in_range_or_a_usage_error(text: str) -> None:
    checks = (
        (parse_count, 1, MAX_COUNT),
        (parse_size, 1, 1 << 50),
        (parse_memory_mib, 1, MAX_MEMORY_MIB),
        (parse_seconds, 1e-6, MAX_SECONDS),
    )
    for parse, low, high in checks:
        try:
            value = parse(text)
        except UsageError:
            continue
        assert low <= value <= high
    try:
        n = entry_number(text)
    except UsageError:
        return
    assert n is None or 1 <= n <= MAX_ENTRY


def test_the_block_size_default_is_the_repository_default() -> None:
    from vml.plumbing.repository import DEFAULT_BLOCK_SIZE

    init = typer.main.get_command(app).commands["init"]  # type: ignore[attr-defined]
    option = next(p for p in init.params if p.name == "block_size")
    assert parse_size(option.default) == DEFAULT_BLOCK_SIZE
