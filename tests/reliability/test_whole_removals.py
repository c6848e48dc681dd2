"""A removal of several entries (``prune``, ``rm E1 E3``) happens whole or not at all.

Each removal is its own rewrite; a save running in an area below a later one
used to refuse that later rewrite after the earlier ones were done: the
command failed, yet entries were gone.  Now the areas every removal touches
are locked before the first, so the command refuses with nothing changed.
The save runs in a thread of this process, held just before it publishes:
``flock`` locks belong to open files, so threads contend as processes do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, edit, make_area
from vml.errors import RepositoryBusy, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.repository import Repository, init_repository, open_repository
from vml.plumbing.retention import Policy
from vml.porcelain import commit as commit_mod
from vml.porcelain import reshape as reshape_mod
from vml.porcelain.prune import prune
from vml.porcelain.rm import rm


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """E1 <- E2 and, saved full after them, E3 <- E4, which area x holds."""
    r = init_repository(tmp_path / "repo", TEST_BLOCK)
    x = tmp_path / "x"
    make_area(x, disk=4 * TEST_BLOCK)
    commit_mod.commit(r, x, message="one")
    edit(x / "disk.img", 5000, b"two" * 1000)
    commit_mod.commit(r, x, message="two")
    edit(x / "disk.img", 2 * TEST_BLOCK, b"three" * 1000)
    commit_mod.commit(r, x, message="three", kind="full")
    edit(x / "disk.img", 3 * TEST_BLOCK, b"four" * 1000)
    commit_mod.commit(r, x, message="four")
    yield r
    r.close()


def _beside_a_save(
    repo: Repository, area: Path, monkeypatch: pytest.MonkeyPatch, command: Callable[[], object]
) -> tuple[BaseException | None, list[str]]:
    """Run ``command`` while a save in ``area`` is held before it publishes."""
    held, go = threading.Event(), threading.Event()
    real = commit_mod.publish_entry
    saver: list[int] = []

    def hold(*args: object, **kwargs: object) -> object:
        if threading.get_ident() in saver:
            held.set()
            go.wait(30)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    saved: list[str] = []

    def save() -> None:
        saver.append(threading.get_ident())
        own = open_repository(repo.path)
        try:
            saved.append(commit_mod.commit(own, area, message="five").entry)
        finally:
            own.close()
            held.set()

    monkeypatch.setattr(commit_mod, "publish_entry", hold)
    (area / "notes.txt").write_text("more work")
    thread = threading.Thread(target=save)
    thread.start()
    error: BaseException | None = None
    try:
        assert held.wait(60)
        try:
            command()
        except VMLError as e:
            error = e
    finally:
        go.set()
        thread.join(60)
    return error, saved


@pytest.mark.parametrize(
    "command",
    [
        lambda r: prune(r, Policy(last=1)),  # E1, E2, then E3 (whose child x holds)
        lambda r: rm(r, ["E1", "E3"], force=True),
    ],
    ids=["prune", "rm-two"],
)
def test_a_removal_beside_a_save_below_it_refuses_whole(
    repo: Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: Callable[[Repository], object],
) -> None:
    before = refs_mod.read_refs(repo).entries
    error, saved = _beside_a_save(repo, tmp_path / "x", monkeypatch, lambda: command(repo))
    assert isinstance(error, RepositoryBusy), error
    assert "already removed" not in str(error)
    now = refs_mod.read_refs(repo).entries
    assert {n: now[n] for n in before} == before  # nothing removed, nothing rewritten
    assert saved == ["E5"]  # and the save published on its parent, E4


def test_a_removal_that_fails_midway_says_what_it_removed(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error after some removals (a full disk, say) names those already done."""
    real = reshape_mod.remove_one
    calls: list[bytes] = []

    def second_fails(r: Repository, commit: bytes, *args: object, **kwargs: object) -> None:
        calls.append(commit)
        if len(calls) == 2:
            raise VMLError("no space left on device", "free some space")
        real(r, commit, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reshape_mod, "remove_one", second_fails)
    with pytest.raises(VMLError) as info:
        rm(repo, ["E1", "E2"], force=True)
    assert str(info.value) == (
        "no space left on device (already removed before this: E1); free some space"
    )
    assert sorted(refs_mod.read_refs(repo).entries) == [2, 3, 4]
