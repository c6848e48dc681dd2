"""The first minute, as a newcomer meets it (#13).

- the demo's closing suggestion works as printed: from inside an area,
  ``vml checkout E1 ../e1-copy`` uses the area's repository;
- a ``git clone --mirror`` of a server that received ``vml push`` lists its
  entries (they are numbered on first use, as ``vml fetch`` numbers them);
- shell completion suggests entries, tags, branches and remotes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from tests.conftest import make_area
from vml.cli import completion
from vml.cli.root import app
from vml.errors import RepositoryBusy

runner = CliRunner()


@pytest.fixture
def newcomer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $VML_REPO, a home without a default repository, standing in tmp_path."""
    for var in ("VML_REPO", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def vml(*args: str | Path, code: int = 0, **env: str) -> str:
    res = runner.invoke(app, [str(a) for a in args], env=env or None, prog_name="vml")
    assert res.exit_code == code, (args, res.output, res.exception)
    return res.stdout


def test_the_demo_s_suggestion_works_as_printed(newcomer: Path) -> None:
    out = vml("demo", "play")
    line = next(x for x in out.splitlines() if x.startswith("Try: cd "))
    first, *commands = line.removeprefix("Try: ").split(" && ")
    os.chdir(shlex.split(first)[1])
    for command in "; ".join(commands).split("; "):
        words = shlex.split(command)
        assert words[0] == "vml", command
        vml(*words[1:])
    assert (newcomer / "play" / "e1-copy").is_dir()
    # ...and named into a new folder from inside the area, the area's repository is used.
    vml("checkout", "E2", newcomer / "e2-copy", "-q")
    assert not (newcomer / "home" / ".local" / "share" / "vml").exists()


def test_the_repository_of_the_area_named_comes_before_the_one_stood_in(newcomer: Path) -> None:
    ids = {}
    for name in ("r1", "r2"):
        vml("init", newcomer / name, "--block-size", "64K", "-q")
        make_area(newcomer / f"a-{name}", disk=256 << 10, seed=len(ids))
        ids[name] = json.loads(
            vml("-R", newcomer / name, "commit", newcomer / f"a-{name}", "--json", "-m", name)
        )["commit"]
    os.chdir(newcomer / "a-r1")
    assert [e["commit"] for e in json.loads(vml("log", "--json"))] == [ids["r1"]]
    assert json.loads(vml("status", newcomer / "a-r2", "--json"))["commit"] == ids["r2"]


def _pushed_server(base: Path) -> Path:
    """A bare server that received ``vml push`` of two entries."""
    repo, area, server = base / "alice", base / "area", base / "server.git"
    vml("init", repo, "--block-size", "64K", "-q")
    make_area(area, disk=256 << 10)
    vml("-R", repo, "commit", area, "-q", "-m", "one")
    (area / "vm.vmx").write_text("changed\n")
    vml("-R", repo, "commit", area, "-q", "-m", "two")
    subprocess.run(["git", "init", "-q", "--bare", server], check=True)
    vml("-R", repo, "remote", "add", "origin", server, "-q")
    vml("-R", repo, "push", "--all", "-q")
    return server


def test_a_mirror_of_a_server_lists_the_entries_pushed_to_it(newcomer: Path) -> None:
    server = _pushed_server(newcomer)
    mirror = newcomer / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--mirror", server, mirror], check=True)
    out = vml("-R", mirror, "log")
    assert "numbered the entries pushed here: E1, E2" in out
    assert "E2" in out and "two" in out and "no entries yet" not in out
    out = vml("-R", mirror, "log")  # numbered once
    assert "numbered" not in out and "E1" in out
    listed = vml("-R", server, "log", "--json")  # the server itself, and JSON stays JSON
    assert [e["message"] for e in json.loads(listed)] == ["one", "two"]


def test_a_repository_that_cannot_be_written_still_lists(
    newcomer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _pushed_server(newcomer)

    def busy(repo: object) -> list[object]:
        raise RepositoryBusy("the repository is locked")

    monkeypatch.setattr("vml.porcelain.fetch.number_pushed", busy)
    res = runner.invoke(app, ["-R", str(server), "log"])
    assert res.exit_code == 0
    assert "no E-number yet" in res.stderr and "vml fetch" in res.stderr


# --- shell completion -------------------------------------------------------------------


@pytest.fixture
def named(newcomer: Path) -> Path:
    repo, area = newcomer / "repo", newcomer / "area"
    vml("init", repo, "--block-size", "64K", "-q")
    make_area(area, disk=256 << 10)
    vml("-R", repo, "commit", area, "-q", "--tag", "golden")
    (area / "vm.vmx").write_text("changed\n")
    vml("-R", repo, "commit", area, "-q")
    vml("-R", repo, "branch", "work", "E2", "-q")
    vml("-R", repo, "remote", "add", "origin", newcomer / "server.git", "-q")
    vml("-R", repo, "remote", "add", "backup", newcomer / "backup.git", "-q")
    return repo


def _context(repo: Path, *words: str) -> typer.Context:
    root = typer.main.get_command(app)
    return root.make_context("vml", ["-R", str(repo), *words], resilient_parsing=True)  # type: ignore[return-value]


def test_the_completion_functions_suggest_names(named: Path) -> None:
    ctx = _context(named, "show")
    assert [v for v, _h in completion.entries(ctx, "")] == ["E1", "E2", "golden", "work"]
    assert completion.entries(ctx, "e") == [("E1", "tag:golden"), ("E2", "work")]
    assert completion.entries(ctx, "go") == [("golden", "tag")]
    assert completion.tags(ctx, "") == [("golden", "tag")]
    assert completion.branches(ctx, "w") == [("work", "branch")]
    assert [v for v, _u in completion.remotes(ctx, "")] == ["backup", "origin"]
    # No repository there: no suggestion, no error.
    assert completion.entries(_context(named.parent / "nowhere", "show"), "") == []


def _complete(repo: Path, line: str) -> list[str]:
    """What bash completion offers for ``line`` (the word after the last space)."""
    words = ["vml", "-R", str(repo), *line.split(" ")]
    out = vml(
        _VML_COMPLETE="complete_bash", COMP_WORDS=" ".join(words), COMP_CWORD=str(len(words) - 1)
    )
    return out.split()


def test_completion_through_the_shell_protocol(
    named: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _complete(named, "checkout ") == ["E1", "E2", "golden", "work"]
    assert _complete(named, "show g") == ["golden"]
    assert _complete(named, "rm E1 E") == ["E1", "E2"]
    assert _complete(named, "commit --base E") == ["E1", "E2"]
    assert _complete(named, "tag -d ") == ["golden"]
    assert _complete(named, "branch -d w") == ["work"]
    assert _complete(named, "fetch o") == ["origin"]
    assert _complete(named, "push ") == ["backup", "origin"]
    assert _complete(named, "remote remove b") == ["backup"]
    assert set(_complete(named, "ch")) == {"checkout"}  # commands, as typer completes them
    # `--show-completion` alone detects the shell from the process's
    # ancestors (none under a detached CI runner); typer's switch makes it
    # take the shell named, so the script is checked wherever this runs.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    assert re.search(r"_vml_completion", vml("--show-completion", "bash"))
