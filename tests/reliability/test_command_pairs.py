"""Two writing commands on one area and one entry at once.

For every ordered pair of writing commands (commit, checkout, restore, rm,
convert, prune, gc, fetch), the first is started on the shared area and
entries and held at a point inside its work (it has read what it relies on
and not yet published), the second runs meanwhile, then the first goes on.
Whatever the order, each either succeeds or fails with one clear VML error,
and afterwards nothing is inconsistent: every entry's parent is an entry,
every area holds an entry (none left half-checked-out), every entry checks
out and verifies, and git fsck is clean.  Two commands must never both
succeed when one invalidated the other.

Commands run in threads of this process: ``flock`` locks belong to open
files, so threads contend for them exactly as processes do.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, digest_area, edit, make_area, need
from vml.errors import VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import load_state
from vml.plumbing.chains import commit_tree_parent
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository, init_repository, open_repository
from vml.plumbing.retention import Policy
from vml.porcelain import checkout as checkout_mod
from vml.porcelain import clone as clone_mod
from vml.porcelain import commit as commit_mod
from vml.porcelain import convert as convert_mod
from vml.porcelain import fetch as fetch_mod
from vml.porcelain import gc as gc_mod
from vml.porcelain import prune as prune_mod
from vml.porcelain import reshape as reshape_mod
from vml.porcelain import rm as rm_mod
from vml.porcelain.fsck import fsck
from vml.porcelain.names import create_branch
from vml.porcelain.status import status
from vml.porcelain.verify import verify


@dataclass
class World:
    """A repository with E1 <- E2 <- E3; area X holds E3 on branch main, area Y holds E2."""

    repo: Path
    x: Path
    y: Path
    source: Path  # a clone with one entry more, for fetch
    snapshots: dict[str, dict[str, tuple[object, ...]]] = field(default_factory=dict)


def _world(tmp: Path) -> World:
    repo = init_repository(tmp / "repo", TEST_BLOCK)
    x = tmp / "x"
    make_area(x, disk=4 * TEST_BLOCK)
    try:
        commit_mod.commit(repo, x, message="one")
        edit(x / "disk.img", 5000, b"two" * 1000)
        commit_mod.commit(repo, x, message="two")
        edit(x / "disk.img", 2 * TEST_BLOCK, b"three" * 1000)
        commit_mod.commit(repo, x, message="three")
        create_branch(repo, "main", "E3", x)
        y = tmp / "y"
        checkout_mod.checkout(repo, "E2", y)
    finally:
        repo.close()
    source = tmp / "source"
    clone_mod.clone(str(tmp / "repo"), source)
    src = open_repository(source)
    try:
        z = tmp / "z"
        checkout_mod.checkout(src, "E3", z)
        (z / "vm.vmx").write_text("from elsewhere\n")
        commit_mod.commit(src, z, message="elsewhere")
    finally:
        src.close()
    from vml.porcelain import remote as remote_mod

    r = open_repository(tmp / "repo")
    try:
        remote_mod.add(r, "src", str(source))
    finally:
        r.close()
    return World(tmp / "repo", x, y, source)


Command = Callable[[Repository, World], object]


def _commit(r: Repository, w: World) -> object:
    (w.x / "notes.txt").write_text("more work")
    return commit_mod.commit(r, w.x, message="work")


COMMANDS: dict[str, Command] = {
    "commit": _commit,
    "checkout": lambda r, w: checkout_mod.checkout(r, "E2", w.x, force=True),
    "restore": lambda r, w: checkout_mod.restore(r, "E1", w.x, force=True),
    "rm": lambda r, w: rm_mod.rm(r, ["E2"], force=True),
    "convert": lambda r, w: convert_mod.convert(r, "E3", "full"),
    "prune": lambda r, w: prune_mod.prune(r, Policy(last=1)),
    "gc": lambda r, w: gc_mod.gc(r),
    "fetch": lambda r, w: fetch_mod.fetch(r, "src"),
}

# Where each command is held: after it has read what it relies on, before it
# publishes (module, attribute).  Checkout is also held before it claims.
HOLDS: dict[str, tuple[object, str]] = {
    "commit": (commit_mod, "publish_entry"),
    "checkout": (checkout_mod, "_claim"),
    "restore": (checkout_mod.Builder, "build"),
    "rm": (reshape_mod, "apply_rewrite"),
    "convert": (reshape_mod, "apply_rewrite"),
    "prune": (reshape_mod, "apply_rewrite"),
    "gc": (__import__("vml.plumbing.gc", fromlist=["x"]), "pack_extents"),
    "fetch": (fetch_mod, "apply_fetched"),
}


class _Held:
    """Holds one thread at a patched function until released."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self.thread: int | None = None

    def wrap(self, real: Callable[..., object]) -> Callable[..., object]:
        def held(*args: object, **kwargs: object) -> object:
            if threading.get_ident() == self.thread and not self.go.is_set():
                self.reached.set()
                self.go.wait(30)
            return real(*args, **kwargs)

        return held


@dataclass
class Outcome:
    result: object = None
    error: BaseException | None = None


def _run(w: World, name: str, out: Outcome, held: _Held | None = None) -> None:
    if held is not None:
        held.thread = threading.get_ident()
    r = open_repository(w.repo)
    try:
        out.result = COMMANDS[name](r, w)
    except BaseException as e:
        out.error = e
    finally:
        r.close()
        if held is not None:
            held.reached.set()  # finished (or failed) without reaching the hold


def _check(w: World, outcomes: dict[str, Outcome]) -> None:
    for name, o in outcomes.items():
        if o.error is not None and not isinstance(o.error, VMLError):
            raise AssertionError(f"{name} failed with {o.error!r}") from o.error
    need("git")
    fsck_git = subprocess.run(
        ["git", "--git-dir", str(w.repo), "fsck", "--full", "--strict", "--no-dangling"],
        capture_output=True,
        text=True,
    )
    assert fsck_git.returncode == 0, fsck_git.stderr
    r = open_repository(w.repo)
    try:
        table = refs_mod.read_refs(r)
        entries = set(table.entries.values())
        reader = PackReader(r)
        try:
            for c in entries:  # a forest of named entries: no parent without a name
                parent = commit_tree_parent(reader, c)[1]
                assert parent is None or parent in entries, f"{c.hex()[:12]}'s parent has no name"
        finally:
            reader.close()
        for b, c in table.branches.items():
            assert c in entries, f"branch {b} points at no entry"
        for area in (w.x, w.y):
            st = load_state(area)
            assert st is not None and st.pending is None, f"{area.name} was left half-written"
            assert st.entry is None or bytes.fromhex(st.entry) in entries, (
                f"{area.name} holds a commit no entry names"
            )
            if st.entry is not None and status(r, area).clean:
                out = area.parent / f"check-{area.name}"
                checkout_mod.checkout(r, st.entry, out)
                assert digest_area(out) == digest_area(area)
        assert fsck(r).clean, fsck(r).problems
        res = verify(r, [], all_entries=True, read_data=True)
        assert res.clean, res.problems
    finally:
        r.close()


PAIRS = list(itertools.product(COMMANDS, COMMANDS))


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
def test_two_writing_commands_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, second: str
) -> None:
    w = _world(tmp_path)
    held = _Held()
    owner, attr = HOLDS[first]
    monkeypatch.setattr(owner, attr, held.wrap(getattr(owner, attr)))
    outcomes = {first: Outcome(), second: Outcome()}
    a = threading.Thread(target=_run, args=(w, first, outcomes[first], held))
    a.start()
    assert held.reached.wait(60), f"{first} never got going"
    # The second command runs while the first is held.  It may have to wait
    # for a lock the first holds: let the first go on after a while.
    b = threading.Thread(target=_run, args=(w, second, outcomes[second]))
    b.start()
    b.join(3)
    held.go.set()
    a.join(60)
    b.join(60)
    assert not a.is_alive() and not b.is_alive(), "a command hung"
    _check(w, outcomes)
