"""A forest rewrite killed at any instant: the next command finishes it, nothing is lost.

``vml convert``, ``vml rm`` and ``vml prune`` move many names (E-numbers,
tags, branches, every area holding a rewritten entry), one atomic write at
a time.  Each test stops the command before each of those writes in turn
(counted on an uninterrupted run of the same scenario; the stop is an
exception no code catches, as a kill: no ``except`` runs, only the locks
and files a dead process would drop are let go), then opens the repository
as the next command does and checks that every area names an entry, every
entry's parent is an entry, the names sit where an uninterrupted run puts
them, `vml fsck` and `git fsck --full --strict` pass, a save in the area is
a child of its entry, and after `vml gc` every entry still reads whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, edit, make_area
from tests.reliability.helpers import ROOT, vml
from vml.plumbing import forest as forest_mod
from vml.plumbing import journal as journal_mod
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import load_state, save_state
from vml.plumbing.chains import read_entry
from vml.plumbing.forest import load_forest
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository, init_repository, open_repository
from vml.plumbing.retention import Policy
from vml.plumbing.verify import entry_objects
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit
from vml.porcelain.convert import convert
from vml.porcelain.fsck import fsck
from vml.porcelain.gc import gc
from vml.porcelain.names import create_branch, create_tag
from vml.porcelain.prune import prune
from vml.porcelain.rm import rm
from vml.porcelain.verify import verify


class Killed(BaseException):
    """The process died here."""


def scenario(root: Path) -> tuple[Repository, Path, Path]:
    """E1..E4 saved in area A (holding E4); area B holds E2 and follows branch dev at E2.

    Tag ``good`` (plain) names E3, tags ``ann`` (annotated by git, packed) and ``loose``
    (annotated by git, loose) E2.
    """
    repo = init_repository(root / "repo", TEST_BLOCK)
    a = root / "area A"
    make_area(a)
    for i in range(4):
        commit(repo, a, message=f"state {i}", allow_empty=True)
        edit(a / "disk.img", 70_000 * i + 1000, bytes([i + 1]) * (5000 + 40_000 * (i % 2)))
    b = root / "area B"
    checkout(repo, "E2", b)
    create_branch(repo, "dev", "E2", b)
    create_tag(repo, "good", "E3", None)
    e2 = refs_mod.read_refs(repo).entries[2].hex()
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "ann", "-m", "x", e2],
        cwd=repo.path,
        check=True,
        capture_output=True,
    )
    # Packed, as git packs refs (VML peels an annotated tag through packed-refs).
    subprocess.run(["git", "pack-refs", "--all"], cwd=repo.path, check=True)
    # And a loose one, as `git tag -a` leaves it (peeled through its tag object).
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "loose", "-m", "y", e2],
        cwd=repo.path,
        check=True,
        capture_output=True,
    )
    return repo, a, b


OPS: dict[str, Callable[[Repository], object]] = {
    "convert": lambda r: convert(r, "E2", "full"),
    "rm": lambda r: rm(r, ["E2"], force=True),
    "prune": lambda r: prune(r, Policy(last=1)),
}


def shape(repo: Repository, areas: list[Path]) -> dict[str, object]:
    """The names as numbers: what an uninterrupted run and a finished one must agree on."""
    table = refs_mod.read_refs(repo)
    num = table.numbers()
    reader = PackReader(repo)
    try:
        forest = load_forest(reader, table)
    finally:
        reader.close()
    out: dict[str, object] = {}
    for n, c in sorted(table.entries.items()):
        p = forest.parent.get(c)
        out[f"E{n}"] = None if p is None else num.get(p, f"not an entry: {p.hex()}")
    for t, c in sorted(table.tags.items()):
        out[f"tag {t}"] = num.get(c, "not an entry")
    for br, c in sorted(table.branches.items()):
        out[f"branch {br}"] = num.get(c, "not an entry")
    for a in areas:
        st = load_state(a)
        assert st is not None
        for f in ("entry", "pending", "branch_at"):
            v = getattr(st, f)
            out[f"{a.name} {f}"] = None if v is None else num.get(bytes.fromhex(v), "not an entry")
    return out


def count_writes(monkeypatch: pytest.MonkeyPatch, stop_at: int | None) -> list[str]:
    """Count (and stop before the ``stop_at``-th of) the name moves: refs and area states."""
    seen: list[str] = []

    def wrap(mod: object, name: str) -> None:
        real = getattr(mod, name)

        def spy(*args: object, **kwargs: object) -> object:
            if stop_at is not None and len(seen) == stop_at:
                raise Killed
            seen.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)

    wrap(refs_mod, "set_ref")
    wrap(refs_mod, "delete_ref")
    for mod in (forest_mod, journal_mod):
        if hasattr(mod, "save_state"):
            wrap(mod, "save_state")
    return seen


def run_op(root: Path, op: str, monkeypatch: pytest.MonkeyPatch, stop_at: int | None) -> int:
    """Build the scenario in ``root`` and run ``op``, stopped before write ``stop_at``."""
    repo, _a, _b = scenario(root)
    with monkeypatch.context() as m:
        seen = count_writes(m, stop_at)
        try:
            OPS[op](repo)
        except Killed:
            pass
        else:
            assert stop_at is None, "the command made fewer writes than counted"
    repo.close()
    return len(seen)


def check_finished(root: Path, expected: dict[str, object]) -> None:
    """The next command sees the rewrite finished, valid and whole."""
    a, b = root / "area A", root / "area B"
    repo = open_repository(root / "repo")  # the next command
    try:
        assert not journal_mod.journal_path(repo).exists()
        assert shape(repo, [a, b]) == expected
        res = fsck(repo)
        assert res.clean, res.problems
        git = subprocess.run(
            ["git", "fsck", "--full", "--strict"], cwd=repo.path, capture_output=True, text=True
        )
        assert git.returncode == 0, git.stderr
        gc(repo)
        res = verify(repo, [], all_entries=True, read_data=True)
        assert res.clean, res.problems
        held = load_state(a)
        assert held is not None and held.entry is not None
        edit(a / "disk.img", 900_000, b"later")
        made = commit(repo, a, message="after")
        assert made.kind != "full" or expected["area A entry"] is None
        assert made.parent == f"E{expected['area A entry']}"
    finally:
        repo.close()


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_rewrite_killed_before_each_name_move_is_finished_by_the_next_command(
    op: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "whole"
    writes = run_op(whole, op, monkeypatch, None)
    assert writes >= 5  # areas, E-numbers, tags, a branch
    r = open_repository(whole / "repo")
    expected = shape(r, [whole / "area A", whole / "area B"])
    r.close()
    assert "not an entry" not in str(expected)
    for k in range(writes):
        check_finished_after = tmp_path / f"killed-{k}"
        run_op(check_finished_after, op, monkeypatch, k)
        check_finished(check_finished_after, expected)


def test_a_rewrite_killed_after_its_last_move_leaves_no_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, a, b = scenario(tmp_path / "t")

    def die_at_the_end(i: int, n: int) -> None:
        if i == n:
            raise Killed

    monkeypatch.setattr(journal_mod, "on_step", die_at_the_end)
    with pytest.raises(Killed):
        convert(repo, "E2", "full")
    assert journal_mod.journal_path(repo).exists()
    monkeypatch.setattr(journal_mod, "on_step", None)
    repo.close()
    again = open_repository(tmp_path / "t" / "repo")
    assert not journal_mod.journal_path(again).exists()
    assert "not an entry" not in str(shape(again, [a, b]))
    assert fsck(again).clean
    again.close()


def test_a_writer_that_takes_the_lock_finishes_the_rewrite_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that opened the repository before the kill finishes it when it takes the lock."""
    repo, a, b = scenario(tmp_path / "t")
    early = open_repository(repo.path)  # opened while the rewrite still ran
    with monkeypatch.context() as m:
        count_writes(m, 2)
        with pytest.raises(Killed):
            convert(repo, "E2", "full")
    assert journal_mod.journal_path(repo).exists()
    create_tag(early, "later", "E4", None)  # takes the lock
    assert not journal_mod.journal_path(repo).exists()
    table = refs_mod.read_refs(early)
    assert table.tags["later"] == table.entries[4]
    assert "not an entry" not in str(shape(early, [a, b]))
    early.close()
    repo.close()


def test_an_area_another_command_holds_is_finished_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vml.plumbing.areas import lock_area

    repo, a, b = scenario(tmp_path / "t")
    with monkeypatch.context() as m:
        count_writes(m, 0)  # killed before its first move: area A still on the old E4
        with pytest.raises(Killed):
            convert(repo, "E2", "full")
    with lock_area(a):  # a command in area A, started before the replay
        again = open_repository(repo.path)
        assert journal_mod.journal_path(again).exists()  # area A's move waits
        table = refs_mod.read_refs(again)
        st = load_state(a)
        assert st is not None and bytes.fromhex(st.entry or "") not in table.entries.values()
    third = open_repository(repo.path)
    assert not journal_mod.journal_path(third).exists()
    assert "not an entry" not in str(shape(third, [a, b]))
    assert fsck(third).clean
    for r in (repo, again, third):
        r.close()


def test_gc_keeps_the_commit_an_area_names_when_no_ref_reaches_it(tmp_path: Path) -> None:
    """An area left on a commit that is no entry (as an earlier VML's killed rewrite left it)."""
    repo, a, _b = scenario(tmp_path / "t")
    convert(repo, "E4", "full")  # area A follows: it holds the full rewrite of E4
    st = load_state(a)
    assert st is not None and st.entry is not None
    full = st.entry
    convert(repo, "E4", "incremental", base="E3")  # E4 again on E3: no ref reaches `full`
    assert refs_mod.read_refs(repo).entries[4].hex() != full
    st.entry = full
    save_state(a, st)
    gc(repo)
    reader = PackReader(repo)
    try:
        for _item in entry_objects(reader, read_entry(reader, bytes.fromhex(full))):
            pass  # raises when an object is gone
    finally:
        reader.close()
    repo.close()


_CHILD = """
import os, signal, sys
from vml.plumbing import journal

stop = int(sys.argv.pop(1))

def die(i, n):
    if i == stop:
        os.kill(os.getpid(), signal.SIGKILL)

journal.on_step = die
from vml.cli.app import main

sys.argv[0] = "vml"
main()
"""


@pytest.mark.parametrize("stop", [0, 3, 99])
def test_a_real_kill_of_vml_convert_is_finished_by_the_next_command(
    tmp_path: Path, stop: int
) -> None:
    """SIGKILL inside the CLI's convert (its pack claim left behind): fsck, gc, verify pass."""
    repo, a, b = scenario(tmp_path)
    repo.close()
    path = tmp_path / "repo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [
        sys.executable,
        "-c",
        _CHILD,
        str(stop),
        "-R",
        str(path),
        "convert",
        "E2",
        "--to",
        "full",
    ]
    res = subprocess.run(args, env=env, capture_output=True, text=True)
    assert res.returncode == (0 if stop == 99 else -signal.SIGKILL), res.stderr
    assert vml(path, "fsck").code == 0  # the first command after the kill finishes it
    git = subprocess.run(["git", "fsck", "--full", "--strict"], cwd=path, capture_output=True)
    assert git.returncode == 0, git.stderr
    assert vml(path, "gc").code == 0
    done = vml(path, "verify", "--all", "--read-data")
    assert done.code == 0, done.err
    r = open_repository(path)
    assert not journal_mod.journal_path(r).exists()
    got = shape(r, [a, b])
    assert "not an entry" not in str(got) and got["E2"] is None and got["E3"] == 2
    r.close()
