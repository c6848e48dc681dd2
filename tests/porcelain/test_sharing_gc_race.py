"""A fetch (or clone) racing with ``vml gc`` never leaves refs to missing objects.

The race is made deterministic: gc runs exactly between the arrival of the
fetched pack (``remotes.receive``) and the moment fetch points refs at it.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_BLOCK, three_entries
from vml.errors import RepositoryBusy
from vml.plumbing import gc as gc_mod
from vml.plumbing import refs as refs_mod
from vml.plumbing import remotes as remotes_mod
from vml.plumbing.keeps import PENDING_KEEP
from vml.plumbing.repository import Repository, init_repository, open_repository
from vml.porcelain import clone as clone_mod
from vml.porcelain import fetch as fetch_mod
from vml.porcelain import remote as remote_mod
from vml.porcelain.checkout import checkout


def digest(area: Path) -> dict[str, str]:
    """sha256 of every file of an area (VML's own folder left out)."""
    return {
        str(p.relative_to(area)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(area.rglob("*"))
        if p.is_file() and ".vml" not in p.relative_to(area).parts
    }


def fsck(path: Path) -> None:
    done = subprocess.run(
        ["git", "--git-dir", str(path), "fsck", "--full", "--strict", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "invalid sha1 pointer" not in done.stdout + done.stderr


@pytest.fixture
def alice(tmp_path: Path) -> Repository:
    """A repository with a chain E1 (full) <- E2 and a differential E3 from E1."""
    r = three_entries(tmp_path / "alice", tmp_path / "a-area")
    return r


def gc_after_receive(
    monkeypatch: pytest.MonkeyPatch,
    collected: list[int],
    before_gc: Callable[[Repository], None] = lambda repo: None,
) -> None:
    """Run a full gc right after the fetched pack landed, before any ref is set."""
    real = remotes_mod.receive

    def racing(repo: Repository, *args: Any, **kwargs: Any) -> remotes_mod.Received:
        got = real(repo, *args, **kwargs)
        before_gc(repo)
        res = gc_mod.collect(repo)
        collected.append(sum(1 for p in res.packs if p.action == "delete"))
        return got

    monkeypatch.setattr(remotes_mod, "receive", racing)


def pending_keeps(repo: Repository) -> list[Path]:
    return [
        p
        for p in (repo.objects_dir / "pack").glob("pack-*.keep")
        if p.read_text().startswith(PENDING_KEEP)
    ]


def check_entries(alice: Repository, other: Repository, tmp_path: Path) -> None:
    """Every entry of alice arrived and checks out identically."""
    mine = refs_mod.read_refs(alice).entries
    theirs = {c: n for n, c in refs_mod.read_refs(other).entries.items()}
    assert set(theirs) == set(mine.values())
    for n, c in mine.items():
        checkout(alice, f"E{n}", tmp_path / f"a{n}")
        checkout(other, f"E{theirs[c]}", tmp_path / f"o{n}")
        assert digest(tmp_path / f"a{n}") == digest(tmp_path / f"o{n}")


def test_fetch_pack_survives_a_concurrent_gc(
    alice: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = init_repository(tmp_path / "bob", TEST_BLOCK)
    remote_mod.add(bob, "alice", str(alice.path))
    collected: list[int] = []
    gc_after_receive(monkeypatch, collected)
    res = fetch_mod.fetch(bob, "alice")
    assert collected == [0]  # gc ran in the window and took nothing
    assert [e.entry for e in res.new_entries] == ["E1", "E2", "E3"]
    assert pending_keeps(bob) == []  # the marker is released once refs are set
    fsck(bob.path)
    check_entries(alice, bob, tmp_path)
    # now the pack is referenced: gc keeps it without any marker
    gc_mod.collect(bob)
    fsck(bob.path)
    bob.close()


def test_clone_pack_survives_a_concurrent_gc(
    alice: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collected: list[int] = []
    gc_after_receive(monkeypatch, collected)
    clone_mod.clone(str(alice.path), tmp_path / "carol")
    assert collected == [0]
    carol = open_repository(tmp_path / "carol")
    assert pending_keeps(carol) == []
    fsck(carol.path)
    check_entries(alice, carol, tmp_path)
    carol.close()


def test_unprotected_pack_taken_by_gc_fails_cleanly(
    alice: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Should the marker ever come too late (gc saw the pack without it), the
    # check under the lock refuses to set refs to what gc took.
    bob = init_repository(tmp_path / "bob", TEST_BLOCK)
    remote_mod.add(bob, "alice", str(alice.path))
    collected: list[int] = []

    def drop_markers(repo: Repository) -> None:
        for keep in pending_keeps(repo):
            keep.unlink()

    gc_after_receive(monkeypatch, collected, drop_markers)
    with pytest.raises(RepositoryBusy) as exc:
        fetch_mod.fetch(bob, "alice")
    assert exc.value.remedy == "run the same command again"
    assert collected == [1]  # gc did take the fetched pack
    assert refs_mod.read_refs(bob).entries == {}
    assert [r for r in bob.git.refs.allkeys() if r.startswith(b"refs/")] == []
    fsck(bob.path)

    monkeypatch.undo()
    res = fetch_mod.fetch(bob, "alice")
    assert [e.entry for e in res.new_entries] == ["E1", "E2", "E3"]
    assert pending_keeps(bob) == []
    fsck(bob.path)
    check_entries(alice, bob, tmp_path)
    bob.close()
