"""The ``vml`` command on real repositories: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import TEST_BLOCK, digest_area, edit, make_area
from vml.cli.root import app

runner = CliRunner()


def vml(*args: str | Path, code: int = 0) -> str:
    """Run ``vml ARGS``; check the exit code; return stdout (stderr when it failed)."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    if code:
        # One line on stderr, starting with "vml:", nothing on stdout.
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vml: "), res.stderr
        return lines[0]
    return res.stdout


@pytest.fixture
def cli_repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    out = vml("init", r, "--block-size", str(TEST_BLOCK))
    assert "Initialised" in out and "64.0 KiB" in out
    return r


def test_save_and_check_out(cli_repo: Path, tmp_path: Path) -> None:
    area = tmp_path / "area"
    make_area(area)
    out = vml("--repo", cli_repo, "commit", area, "-m", "first")
    assert out.splitlines()[0] == "E1" and "full entry E1" in out
    edit(area / "disk.img", 0, b"x" * 4096)
    out = vml("--repo", cli_repo, "commit", area, "--tag", "good")
    assert "incremental entry E2 (parent E1, tag good)" in out
    saved = digest_area(area, mtimes=True)
    dest = tmp_path / "copy"
    out = vml("--repo", cli_repo, "checkout", "good", dest)
    assert "checked out E2" in out and "(fresh)" in out
    assert digest_area(dest, mtimes=True) == saved
    out = vml("--repo", cli_repo, "restore", "E1", area)
    assert "restored E1" in out and "child of E1" in out


def test_errors_are_one_line_with_exit_codes(cli_repo: Path, tmp_path: Path) -> None:
    area = tmp_path / "area"
    make_area(area)
    # not a repository: says to run vml init
    line = vml("--repo", tmp_path / "nowhere", "commit", area, code=3)
    assert "no VML repository" in line and "vml init" in line
    # missing area
    line = vml("--repo", cli_repo, "commit", tmp_path / "missing", code=5)
    assert "no working area" in line
    # a VMware lock in the area
    (area / "vm.vmx.lck").mkdir()
    line = vml("--repo", cli_repo, "commit", area, code=6)
    assert "vm.vmx.lck" in line and "shut down" in line
    (area / "vm.vmx.lck").rmdir()
    # --base before any entry of the area
    line = vml("--repo", cli_repo, "commit", area, "--differential", "--base", "E1", code=2)
    assert "first save is full" in line
    vml("--repo", cli_repo, "commit", area, "-q")
    # unknown entry
    line = vml("--repo", cli_repo, "checkout", "E9", tmp_path / "x", code=4)
    assert "no entry named 'E9'" in line and "vml log" in line
    assert not (tmp_path / "x").exists()
    # nothing to commit without --allow-empty
    line = vml("--repo", cli_repo, "commit", area, code=1)
    assert "nothing changed" in line and "--allow-empty" in line
    out = vml("--repo", cli_repo, "commit", area, "--allow-empty")
    assert out.splitlines()[0] == "E2"
    # two kinds at once
    line = vml("--repo", cli_repo, "commit", area, "--full", "--differential", code=2)
    assert "--full and --differential exclude each other" in line
    # bad block size
    vml("init", tmp_path / "r2", "--block-size", "1000", code=2)
    vml("init", cli_repo, code=2)  # already a repository


def test_base_goes_with_differential(cli_repo: Path, tmp_path: Path) -> None:
    area = tmp_path / "area"
    make_area(area)
    vml("--repo", cli_repo, "commit", area, "-q")
    for i in range(2):
        edit(area / "disk.img", i * 4096, b"y" * 4096)
        vml("--repo", cli_repo, "commit", area, "-q")
    edit(area / "disk.img", 3 * 4096, b"z" * 4096)
    # --base alone once silently made a differential entry: a usage error now (#14)
    line = vml("--repo", cli_repo, "commit", area, "--base", "E2", code=2)
    assert "--base goes with --differential" in line
    assert vml("--repo", cli_repo, "log").count("incremental") == 2  # no entry was made
    out = vml("--repo", cli_repo, "commit", area, "--differential", "--base", "E2")
    assert "differential entry E4 (parent E2" in out
    edit(area / "disk.img", 4 * 4096, b"w" * 4096)
    line = vml("--repo", cli_repo, "commit", area, "--base", "E2", "--full", code=2)
    assert "--base goes with --differential" in line
    line = vml("--repo", cli_repo, "commit", area, "--base", "E2", "--incremental", code=2)
    assert "--base goes with --differential" in line
    out = vml("--repo", cli_repo, "commit", area, "--differential")
    assert "differential entry E5 (parent E1" in out


def test_dirty_checkout_names_the_files(cli_repo: Path, tmp_path: Path) -> None:
    area = tmp_path / "area"
    make_area(area)
    vml("--repo", cli_repo, "commit", area, "-q")
    edit(area / "disk.img", 0, b"x" * 10)
    vml("--repo", cli_repo, "commit", area, "-q")
    edit(area / "disk.img", 0, b"unsaved")
    (area / "vm.vmx").write_text("edited\n")
    line = vml("--repo", cli_repo, "restore", "E1", area, code=5)
    assert "unsaved changes" in line and "disk.img" in line and "vm.vmx" in line
    assert "--force" in line
    line = vml("--repo", cli_repo, "checkout", "E1", area, code=5)
    assert "disk.img" in line
    vml("--repo", cli_repo, "restore", "E1", area, "--force", "-q")
    out = tmp_path / "other"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    line = vml("--repo", cli_repo, "checkout", "E1", out, code=5)
    assert "mine.txt" in line


def test_log_json_status_json_show(
    cli_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    area = tmp_path / "area"
    make_area(area, disk=16 * TEST_BLOCK)
    vml("--repo", cli_repo, "commit", area, "-q", "-m", "base")  # E1
    for i in range(3):  # E2, E3, E4
        edit(area / "disk.img", i * 4096, b"y" * 4096)
        vml("--repo", cli_repo, "commit", area, "-q")
    edit(area / "disk.img", 8 * TEST_BLOCK, b"5" * 4096)
    vml("--repo", cli_repo, "commit", area, "-q")  # E5 <- E4
    vml("--repo", cli_repo, "restore", "E4", area, "-q")
    edit(area / "disk.img", 9 * TEST_BLOCK, b"6" * 4096)
    vml("--repo", cli_repo, "commit", area, "-q")  # E6 <- E4

    # status --json reports the changed bytes of the large file
    edit(area / "disk.img", 2 * TEST_BLOCK, b"\x01" * 3 * 4096)
    edit(area / "disk.img", 12 * TEST_BLOCK + 100, b"\x02" * 10)
    doc = json.loads(vml("--repo", cli_repo, "status", area, "--json"))
    assert doc["entry"] == "E6" and not doc["clean"]
    [change] = doc["changes"]
    assert change["path"] == "disk.img" and change["change"] == "modified"
    assert change["changed_bytes"] == 4 * 4096
    out = vml("--repo", cli_repo, "status", area)
    assert "disk.img" in out and "16.0 KiB changed" in out

    monkeypatch.chdir(tmp_path)  # log reads the current folder
    items = json.loads(vml("--repo", cli_repo, "log", "--all", "--json"))
    parents = {d["id"]: d["parent"] for d in items}
    assert parents == {"E1": None, "E2": "E1", "E3": "E2", "E4": "E3", "E5": "E4", "E6": "E4"}
    by_id = {d["id"]: d for d in items}
    assert sorted(by_id["E4"]["children"]) == ["E5", "E6"]
    assert by_id["E1"]["message"] == "base" and by_id["E1"]["kind"] == "full"
    graph = vml("--repo", cli_repo, "log", "--graph", "--all")
    assert "E5" in graph and "E6" in graph and "└── " in graph
    shown = json.loads(vml("--repo", cli_repo, "show", "E6", "--json"))
    assert shown["chain"] == ["E6", "E4", "E3", "E2", "E1"]
    line = vml("--repo", cli_repo, "show", "nope", code=4)
    assert "nope" in line


def test_tags_and_branches(cli_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    area = tmp_path / "area"
    make_area(area)
    vml("--repo", cli_repo, "commit", area, "-q")
    monkeypatch.chdir(area)  # tag and branch name the area in the current folder
    assert "tag v1 on E1" in vml("--repo", cli_repo, "tag", "v1")
    assert "v1  E1" in vml("--repo", cli_repo, "tag")
    line = vml("--repo", cli_repo, "tag", "v1", code=2)
    assert "exists already" in line
    line = vml("--repo", cli_repo, "tag", "E4", code=2)
    assert "not a valid tag name" in line
    out = vml("--repo", cli_repo, "branch", "main")
    assert "branch main at E1; this area follows it" in out
    edit(area / "disk.img", 0, b"x")
    out = vml("--repo", cli_repo, "commit", ".")
    assert "branch main" in out
    assert "* main  E2" in vml("--repo", cli_repo, "branch")
    assert "deleted tag v1 (was E1)" in vml("--repo", cli_repo, "tag", "-d", "v1")
    line = vml("--repo", cli_repo, "tag", "-d", "v1", code=2)
    assert "no tag named 'v1'" in line
    dest = tmp_path / "by-branch"
    vml("--repo", cli_repo, "checkout", "main", dest, "-q")
    assert digest_area(dest) == digest_area(area)


def test_repository_from_environment_and_area(
    cli_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    area = tmp_path / "area"
    make_area(area)
    monkeypatch.setenv("VML_REPO", str(cli_repo))
    vml("commit", area, "-q")
    monkeypatch.delenv("VML_REPO")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    edit(area / "disk.img", 0, b"x")
    out = vml("commit", area)  # the area remembers its repository
    assert out.splitlines()[0] == "E2"
    line = vml("checkout", "E1", tmp_path / "new", code=3)  # a new folder knows none
    assert "vml init" in line


def test_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = vml("demo", "play")
    assert "E1" in out and "E3" in out and "vml log --graph" in out
    root = tmp_path / "play"
    assert (root / "repo").is_dir()
    restored = next(p for p in root.iterdir() if p.name.startswith("restored"))
    assert restored.is_dir() and any(restored.iterdir())
    line = vml("demo", "play", code=2)  # not empty any more
    assert "not empty" in line
    assert os.listdir(root)  # nothing removed


def test_commit_moves_an_area_to_another_repository_only_with_move(
    cli_repo: Path, tmp_path: Path
) -> None:
    """The refusal names --move: the option is there (#14)."""
    area = tmp_path / "area"
    make_area(area)
    vml("--repo", cli_repo, "commit", area, "-q")
    other = tmp_path / "other"
    vml("init", other, "--block-size", str(TEST_BLOCK), "-q")
    line = vml("--repo", other, "commit", area, code=2)
    assert "--move" in line
    out = vml("--repo", other, "commit", area, "--move")
    assert "full entry E1" in out
    assert vml("--repo", other, "status", area, "--json").count('"entry": "E1"') == 1
