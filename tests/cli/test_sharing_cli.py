"""``vml remote``, ``clone``, ``fetch``, ``pull``, ``push`` through the CLI (#6)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import edit, make_area
from vml.cli.root import app


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VML_REPO", raising=False)
    monkeypatch.delenv("GIT_SSH_COMMAND", raising=False)
    runner = CliRunner()

    def invoke(repo: str, *args: str, code: int = 0) -> str:
        res = runner.invoke(app, ["--repo", repo, *args])
        assert res.exit_code == code, res.output
        return res.output

    return invoke


def test_share_through_a_bare_repository(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    subprocess.run(["git", "init", "-q", "--bare", "server.git"], check=True)
    run("alice", "init", "alice", "--block-size", "64K")
    make_area(tmp_path / "area")
    run("alice", "commit", "area", "-m", "fresh", "-q")
    edit(tmp_path / "area" / "disk.img", 1000, b"e" * 3000)
    run("alice", "commit", "area", "-m", "second", "-q")

    out = run("alice", "remote", "add", "origin", "server.git")
    assert str(tmp_path / "server.git") in out
    listed = json.loads(run("alice", "remote", "list", "--json"))
    assert listed == [{"name": "origin", "url": str(tmp_path / "server.git")}]

    assert "nothing to push" in run("alice", "push", code=2)
    assert "no remote named 'E1'" in run("alice", "push", "E1", code=2)
    out = run("alice", "push", "origin", "--all")
    assert "entries E1, E2" in out
    assert "up to date" in run("alice", "push", "origin", "--all")

    out = run("unused", "clone", "server.git", "bob")
    assert "2 entries" in out
    graph = run("bob", "log", "--graph", "--all")
    assert "E1" in graph and "E2" in graph and "from origin" in graph
    doc = json.loads(run("bob", "log", "--all", "--json"))
    assert {d["remote"] for d in doc} == {"origin"}

    # bob adds an entry and pushes it; alice fetches it as her E3
    run("bob", "checkout", "E2", "bob-area", "-q")
    edit(tmp_path / "bob-area" / "disk.img", 5000, b"b" * 3000)
    run("bob", "commit", "bob-area", "-m", "bob's", "-q")
    assert "entries E3" in run("bob", "push", "origin", "E3")
    fetched = json.loads(run("alice", "fetch", "--json"))
    assert [e["entry"] for e in fetched["new_entries"]] == ["E3"]
    assert "no new entries" in run("alice", "fetch", "origin")
    assert "from origin" in run("alice", "log", "--graph", "--all")
    assert "fetched   from origin" in run("alice", "show", "E3")
    assert "fetched" not in run("alice", "show", "E2")  # her own
    pulled = json.loads(run("alice", "pull", "--json"))
    assert pulled["fetch"]["new_entries"] == []

    assert "no entry, branch or tag named 'E9'" in run("alice", "fetch", "origin", "E9", code=4)
    assert "no remote named 'nowhere'" in run("alice", "fetch", "nowhere", code=2)
    out = run("alice", "remote", "remove", "origin")
    assert "entries stay" in out
    assert "no remotes" in run("alice", "remote", "list")
    assert "E3" in run("alice", "log", "--all")
