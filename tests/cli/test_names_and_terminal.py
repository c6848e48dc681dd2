"""Names and text from other people's repositories (#14).

- whatever a repository holds (messages, tag and branch names, paths) is
  printed with terminal controls shown as escapes, never obeyed, and rich
  markup or emoji codes (``:bug:``) in it printed as typed;
- tag and branch names follow the rule their message states, and never read
  as an E-number or a commit id; a name that reads as two commits is
  ambiguous and says so;
- ``vml remote add`` refuses the names its message forbids and an empty URL;
  ``vml clone`` of a plain git repository says it holds no VML entries.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import edit, make_area
from tests.reliability.helpers import snapshot
from vml.cli.root import app

runner = CliRunner()
# What must never reach a terminal from a repository: C0 (but tab, newline), DEL, C1, bidi.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
EVIL_MESSAGE = "fine\x1b]0;pwned\x07\x1b[2J\x9b31m [red]not red[/red] :bug: \u202eevil"


def vml(repo: Path, *args: str | Path, code: int = 0) -> tuple[str, str]:
    res = runner.invoke(app, ["-R", str(repo), *map(str, args)])
    assert res.exit_code == code, (args, res.output, res.exception)
    return res.stdout, res.stderr


def git(*args: str | Path) -> str:
    return subprocess.run(
        ["git", *map(str, args)], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def alice(tmp_path: Path) -> Path:
    """Alice's repository: E1 with a hostile message, a tag and a branch named with controls."""
    repo, area = tmp_path / "alice", tmp_path / "alice-area"
    vml(repo, "init", repo, "--block-size", "64K")
    make_area(area, disk=256 << 10)
    vml(repo, "commit", area, "-q", "-m", EVIL_MESSAGE)
    commit = git("--git-dir", repo, "rev-parse", "refs/vml/entries/1").strip()
    # Ref names git accepts: C1 controls and bidi marks are bytes >= 0x80 in UTF-8.
    git("--git-dir", repo, "update-ref", "refs/tags/tag\u009b2Jx\u202e", commit)
    git("--git-dir", repo, "update-ref", "refs/heads/br\u009b31m", commit)
    return repo


def test_text_from_another_repository_never_drives_the_terminal(
    alice: Path, tmp_path: Path
) -> None:
    bob = tmp_path / "bob"
    out, err = vml(tmp_path / "unused", "clone", alice, bob)
    seen = out + err
    area = tmp_path / "bob-area"
    vml(bob, "checkout", "E1", area, "-q")
    edit(area / "disk.img", 0, b"x" * 100)
    for args in (
        ["log"],
        ["log", "--graph", "--all"],
        ["show", "E1"],
        ["tag"],
        ["branch"],
        ["areas"],
        ["status", area],
        ["remote", "list"],
        ["fetch"],
        ["show", "tag\u009b2Jx\u202e"],
    ):
        out, err = vml(bob, *args)
        seen += out + err
    assert RAW.search(seen) is None, RAW.findall(seen)
    # Shown, not obeyed and not lost: the escapes are there to read.
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m" in seen and "\\u202eevil" in seen
    assert "[red]not red[/red]" in seen  # markup in a message is text
    assert ":bug:" in seen and "\U0001f41b" not in seen  # so are emoji codes
    assert "tag\\x9b2Jx\\u202e" in seen and "br\\x9b31m" in seen
    # Errors quoting such a name are as harmless.
    _out, err = vml(bob, "show", "nope\x1b[2J", code=4)
    assert RAW.search(err) is None and "nope" in err
    _out, err = vml(bob, "show", "nope:bug:", code=4)
    assert "nope:bug:" in err


@pytest.mark.parametrize(
    "name",
    ["cafe", "deadbeef", "0123456789abcdef0123456789abcdef01234567", "E7", "7", "e12",
     "a b", "x\u202ey", "x\x1b", "-x", ".x", "x.", "x..y", "x/y", "x.lock", ""],
)  # fmt: skip
def test_tag_and_branch_names_outside_the_rule_are_refused(alice: Path, name: str) -> None:
    before = snapshot(alice)
    for kind in ("tag", "branch"):
        _out, err = vml(alice, kind, "--", name, "E1", code=2)
        assert "not a valid" in err or "is empty" in err, err
        assert err.startswith("vml: ") and len(err.splitlines()) == 1
    assert snapshot(alice) == before


@pytest.mark.parametrize("name", ["v1.0", "paper-2026", "day_2", "cafe-au-lait", "abc", "día"])
def test_names_inside_the_rule_are_kept(alice: Path, name: str) -> None:
    vml(alice, "tag", name, "E1")
    assert vml(alice, "show", name)[0].startswith("E1")


def test_a_name_that_is_a_tag_and_an_id_prefix_is_ambiguous(alice: Path, tmp_path: Path) -> None:
    area = tmp_path / "alice-area"
    edit(area / "disk.img", 0, b"y" * 100)
    vml(alice, "commit", area, "-q")
    e1, e2 = (git("--git-dir", alice, "rev-parse", f"refs/vml/entries/{n}").strip() for n in (1, 2))
    # A tag that came from elsewhere, named like E2's id but pointing at E1.
    git("--git-dir", alice, "update-ref", f"refs/tags/{e2[:8]}", e1)
    _out, err = vml(alice, "show", e2[:8], code=4)
    assert "names 2 commits" in err and f"tag {e2[:8]}" in err and f"commit {e2[:12]}" in err
    assert "more characters" in err or "E-number" in err
    assert vml(alice, "show", e2[:12])[0].startswith("E2")  # longer: only the id reads
    # Named like its own commit's id: one commit, no ambiguity.
    git("--git-dir", alice, "update-ref", f"refs/tags/{e1[:6]}", e1)
    assert vml(alice, "show", e1[:6])[0].startswith("E1")


@pytest.mark.parametrize("name", ["a b", "-x", ".x", "x.", "x..y", "x/y", "x\u202e", "x\x1b", ""])
def test_remote_add_refuses_the_names_its_message_forbids(alice: Path, name: str) -> None:
    before = snapshot(alice)
    _out, err = vml(alice, "remote", "add", "--", name, "/srv/vms.git", code=2)
    assert "not a valid remote name" in err or "is empty" in err
    assert snapshot(alice) == before


@pytest.mark.parametrize("url", ["", " ", "\t"])
def test_remote_add_refuses_an_empty_url(alice: Path, url: str) -> None:
    """An empty URL once became the current folder."""
    before = snapshot(alice)
    _out, err = vml(alice, "remote", "add", "origin", url, code=2)
    assert "URL is empty" in err
    assert snapshot(alice) == before
    vml(alice, "clone", url, alice.parent / "c", code=2)
    assert not (alice.parent / "c").exists()


def test_clone_of_a_plain_git_repository_says_it_holds_no_entries(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    git("init", "-q", plain)
    (plain / "README").write_text("not a VM\n")
    git("-C", plain, "add", "README")
    git("-C", plain, "-c", "user.name=n", "-c", "user.email=e@x", "commit", "-qm", "first")
    _out, err = vml(tmp_path, "clone", plain, tmp_path / "copy", code=3)
    assert "holds no VML entries" in err
    assert not (tmp_path / "copy").exists()
    (tmp_path / "mine").mkdir()  # an empty folder given stays, empty
    vml(tmp_path, "clone", plain, tmp_path / "mine", code=3)
    assert list((tmp_path / "mine").iterdir()) == []
    # An empty server (nobody pushed yet) still clones: it is not a plain repository.
    git("init", "-q", "--bare", tmp_path / "empty.git")
    out, _err = vml(tmp_path, "clone", tmp_path / "empty.git", tmp_path / "fresh")
    assert "0 entries" in out
