"""Exit codes: docs/FORMAT.md's table against the error classes, and usage errors exit 2.

The table names, per exit code, the classes of ``vml/errors.py`` that exit
with it; this test reads it, so a new error class, a changed code or a
renamed class cannot leave the document behind.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import vml.errors as errors_mod
from tests.conftest import make_area
from tests.reliability.helpers import repo_state, snapshot
from vml.cli.common import handled
from vml.cli.root import app
from vml.errors import VMLError

FORMAT = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"
runner = CliRunner()


def exit_table() -> dict[int, list[str]]:
    """Exit code -> the error class names FORMAT.md lists for it."""
    text = FORMAT.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    table: dict[int, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|", line)
        if m:
            table[int(m.group(1))] = re.findall(r"`(\w+)`", m.group(2))
    return table


def error_classes() -> dict[str, type[VMLError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors_mod, inspect.isclass)
        if issubclass(cls, VMLError) and cls.__module__ == errors_mod.__name__
    }


def test_the_exit_code_table_names_every_error_class_at_its_code() -> None:
    table = exit_table()
    assert {0, 1, 2, 7, 130} <= set(table)
    listed = [name for names in table.values() for name in names]
    assert sorted(listed) == sorted(error_classes()), "each class listed once, no other name"
    for code, names in table.items():
        for name in names:
            assert error_classes()[name].exit_code == code, name
    assert table[0] == [] and table[130] == []


def test_the_table_reader_sees_a_wrong_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors_mod.RemoteError, "exit_code", 3)
    with pytest.raises(AssertionError):
        test_the_exit_code_table_names_every_error_class_at_its_code()


@pytest.mark.parametrize("name", sorted(error_classes()))
def test_the_one_handler_exits_with_each_class_s_code(name: str) -> None:
    cls = error_classes()[name]

    @handled
    def command() -> None:
        raise cls("what happened", "what to do")

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == cls.exit_code


def test_remote_errors_are_one_of_vml_s_errors() -> None:
    from vml.plumbing import remotes

    assert not hasattr(remotes, "RemoteError") or remotes.RemoteError is errors_mod.RemoteError
    assert errors_mod.RemoteError.exit_code == 1


# --- usage errors exit 2, with one line, and change nothing ----------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path]:
    repo, area = tmp_path / "repo", tmp_path / "area"
    assert runner.invoke(app, ["init", str(repo), "--block-size", "64K"]).exit_code == 0
    make_area(area)
    assert runner.invoke(app, ["-R", str(repo), "commit", str(area), "-q"]).exit_code == 0
    (area / "disk.img").write_bytes(b"changed")
    return repo, area


def usage_error(repo: Path, *args: str) -> str:
    """Run ``vml -R REPO ARGS``: exit 2, one line on stderr, nothing on stdout."""
    res = runner.invoke(app, ["-R", str(repo), *args])
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vml: "), res.stderr
    assert res.stdout == ""
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--full", "--incremental"], "--full and --incremental exclude each other"),
        (["--incremental", "--differential"], "exclude each other"),
        (["--base", "E1"], "--base goes with --differential"),
        (["--base", "E1", "--full"], "--base goes with --differential"),
        (["--no-such-option"], "no such option"),
    ],
)
def test_conflicting_commit_options_are_usage_errors(
    saved: tuple[Path, Path], args: list[str], says: str
) -> None:
    repo, area = saved
    before = repo_state(repo), snapshot(area)
    line = usage_error(repo, "commit", str(area), *args)
    assert says in line
    assert (repo_state(repo), snapshot(area)) == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["checkout"], "missing argument"),
        (["frobnicate"], "no such command 'frobnicate'"),
        (["log", "--graph=yes"], "--graph"),
        (["tag", "-d"], "--delete takes one tag name"),
        (["tag", "-d", "x", "E1"], "--delete takes one tag name"),
        (["verify"], "name the entries to verify"),
    ],
)
def test_the_command_line_s_own_errors_are_one_line_exit_2(
    saved: tuple[Path, Path], args: list[str], says: str
) -> None:
    repo, _area = saved
    before = repo_state(repo)
    assert says in usage_error(repo, *args)
    assert repo_state(repo) == before


def test_no_arguments_still_shows_the_help() -> None:
    res = runner.invoke(app, [])
    assert res.exit_code == 2 and "Usage" in res.stdout and "commit" in res.stdout
