"""A failed `vml fetch`, `vml pull` or `vml remote add` changes nothing on disk.

Each failure is real: a remote that does not answer or is no repository, a
plain git repository, a `git daemon` whose connection a proxy cuts or whose
pack it damages in transit, a name already taken.  After each, the
repository's every file is as before (bar the lock files any command
touches).  A fetch killed after its pack arrived and before its refs moved
keeps the objects and moves no ref: `vml gc` then removes them, or the same
fetch finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat.test_damaged_sources import daemon_root  # noqa: F401 (a fixture)
from tests.compat.test_sharing_servers import free_port
from tests.conftest import edit, make_area, need
from tests.reliability.helpers import (
    ROOT,
    CuttingProxy,
    git_fsck,
    one_line_error,
    repo_files,
    repo_state,
)
from tests.reliability.helpers import vml_in_process as vml
from vml.plumbing.repository import hold_flock


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """E1 <- E2 of one area, ~1 MiB of incompressible data in packs."""
    repo = tmp_path / "src.git"
    assert vml(repo, "init", "--block-size", "64K", repo).code == 0
    area = tmp_path / "a"
    make_area(area, seed=1)
    edit(area / "disk.img", 0, os.urandom(1 << 20))
    assert vml(repo, "commit", "-q", area).code == 0
    edit(area / "disk.img", 300_000, b"x" * 5000)
    assert vml(repo, "commit", "-q", area).code == 0
    return repo


@pytest.fixture
def here(tmp_path: Path) -> Path:
    """A repository with an entry of its own and a remote named origin (elsewhere)."""
    repo = tmp_path / "here.git"
    assert vml(repo, "init", "--block-size", "64K", repo).code == 0
    make_area(tmp_path / "b", seed=2)
    assert vml(repo, "commit", "-q", tmp_path / "b").code == 0
    assert vml(repo, "remote", "add", "origin", tmp_path / "elsewhere").code == 0
    return repo


def _fails_and_changes_nothing(repo: Path, *args: str | Path) -> str:
    before = repo_files(repo)
    run = vml(repo, *args)
    line = one_line_error(run)
    assert repo_files(repo) == before, line
    return line


def _plain_git(folder: Path) -> Path:
    def git(*a: str) -> None:
        subprocess.run(["git", "-C", str(folder), *a], check=True, capture_output=True)

    folder.mkdir()
    git("init", "-q")
    (folder / "f").write_text("a plain git repository\n")
    git("add", "f")
    git("-c", "user.name=a", "-c", "user.email=b@c", "commit", "-qm", "plain")
    return folder


@pytest.mark.parametrize("command", ["fetch", "pull"])
def test_a_remote_that_is_no_vml_repository_changes_nothing(
    tmp_path: Path, here: Path, command: str
) -> None:
    need("git")
    cases = {
        "missing": (tmp_path / "nowhere.git", "no repository at"),
        "empty folder": (tmp_path / "empty", "no repository at"),
        "plain git": (_plain_git(tmp_path / "plain"), "holds no VML entries"),
        "nobody listens": (f"git://127.0.0.1:{free_port()}/x.git", "cannot reach"),
    }
    (tmp_path / "empty").mkdir()
    for name, (url, said) in cases.items():
        assert vml(here, "remote", "add", "r", url).code == 0
        line = _fails_and_changes_nothing(here, command, "r")
        assert said in line, (name, line)
        assert vml(here, "remote", "remove", "r").code == 0


def test_remote_add_refused_changes_nothing(here: Path) -> None:
    line = _fails_and_changes_nothing(here, "remote", "add", "origin", "/some/where")
    assert "exists" in line
    _fails_and_changes_nothing(here, "remote", "add", "bad name", "/some/where")
    _fails_and_changes_nothing(here, "remote", "add", "other", "")


@pytest.fixture
def served(source: Path, daemon_root: tuple[str, Path]) -> Iterator[tuple[int, int]]:  # noqa: F811
    """The source behind `git daemon`: (its port, the size of a whole fetch's reply)."""
    base, root = daemon_root
    source.rename(root / "src.git")
    port = int(base.rsplit(":", 1)[1])
    counting = CuttingProxy(port)
    probe = source.parent / "probe.git"
    try:
        assert vml(probe, "clone", f"git://127.0.0.1:{counting.port}/src.git", probe).code == 0
    finally:
        counting.close()
    size = sum(p.stat().st_size for p in (probe / "objects" / "pack").glob("*.pack"))
    yield port, size


@pytest.mark.parametrize("where", [0.3, 0.6, 0.98])
def test_a_transfer_cut_short_changes_nothing(
    here: Path, served: tuple[int, int], where: float
) -> None:
    port, size = served
    proxy = CuttingProxy(port, cut=int(size * where))
    try:
        _point(here, f"git://127.0.0.1:{proxy.port}/src.git")
        _fails_and_changes_nothing(here, "fetch")
        _fails_and_changes_nothing(here, "pull")
    finally:
        proxy.close()
    _point(here, f"git://127.0.0.1:{port}/src.git")  # and the same fetch then works
    run = vml(here, "fetch")
    assert run.code == 0, run
    assert {e["id"] for e in json.loads(vml(here, "log", "--json").out)} == {"E1", "E2", "E3"}
    git_fsck(here)


@pytest.mark.parametrize("where", [0.5, 0.9])
def test_a_pack_damaged_in_transit_changes_nothing(
    here: Path, served: tuple[int, int], where: float
) -> None:
    port, size = served
    proxy = CuttingProxy(port, flip=int(size * where))
    try:
        _point(here, f"git://127.0.0.1:{proxy.port}/src.git")
        line = _fails_and_changes_nothing(here, "fetch")
    finally:
        proxy.close()
    assert "damaged" in line or "git://" in line, line
    git_fsck(here)


def _point(repo: Path, url: str) -> None:
    """Aim remote origin at ``url`` (as `git remote set-url` would)."""
    assert vml(repo, "remote", "remove", "origin").code == 0
    assert vml(repo, "remote", "add", "origin", url).code == 0


def test_a_fetch_killed_before_its_refs_moved_keeps_objects_and_moves_no_ref(
    tmp_path: Path, source: Path, here: Path
) -> None:
    """Killed while it waits for the repository lock (held here): its pack is durable, no ref moved."""
    _point(here, str(source))
    refs_before, _objects = repo_state(here)
    packs = here / "objects" / "pack"
    before = set(packs.iterdir())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with hold_flock(here / "vml" / "lock", 5, "a test"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vml", "-R", str(here), "fetch"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not any(p.suffix == ".idx" for p in set(packs.iterdir()) - before):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.3)  # now waiting for the lock this test holds
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    new = {p.name for p in set(packs.iterdir()) - before}
    assert {n.rsplit(".", 1)[1] for n in new} == {"pack", "idx", "keep"}, new
    assert repo_state(here)[0] == refs_before  # objects kept, no ref moved
    assert not [p for p in (here / "objects").iterdir() if p.name.startswith("tmp_")]
    git_fsck(here)
    # gc removes what no ref reaches (the dead fetch's claim protects nothing) ...
    assert vml(here, "gc").code == 0
    assert not {p.name for p in packs.iterdir()} & new
    # ... and the same fetch then finishes.
    run = vml(here, "fetch")
    assert run.code == 0, run
    assert {e["id"] for e in json.loads(vml(here, "log", "--json").out)} == {"E1", "E2", "E3"}
    git_fsck(here)


def test_gc_removes_the_spool_of_a_fetch_killed_while_indexing_and_only_that(
    source: Path, here: Path
) -> None:
    """A fetch killed while dulwich indexed its pack leaves ``objects/tmp_pack_*``.

    gc removes such a file once no process holds it open and no one wrote it
    for ten minutes; one a live process holds (a fetch indexing now), or
    written lately, stays.
    """
    pack = max((source / "objects" / "pack").glob("*.pack"), key=lambda p: p.stat().st_size)
    objects = here / "objects"
    dead, held, fresh = (objects / f"tmp_pack_{n}" for n in ("dead01", "held01", "fresh1"))
    for f in (dead, held, fresh):
        f.write_bytes(pack.read_bytes())
    old = time.time() - 3600
    for f in (dead, held):
        os.utime(f, (old, old))
    holder = subprocess.Popen(["sh", "-c", f"exec 3<'{held}'; exec sleep 60"])
    try:
        deadline = time.monotonic() + 10
        while not any(
            os.path.realpath(f"/proc/{holder.pid}/fd/{fd}") == str(held.resolve())
            for fd in os.listdir(f"/proc/{holder.pid}/fd")
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        dry = json.loads(vml(here, "gc", "--dry-run", "--json").out)
        assert dry["deleted_bytes"] >= pack.stat().st_size, dry
        assert dead.exists()
        assert vml(here, "gc").code == 0
        assert not dead.exists() and held.exists() and fresh.exists()
    finally:
        holder.kill()
        holder.wait()
    git_fsck(here)


def test_a_git_lock_file_in_the_way_is_one_line_and_changes_nothing(here: Path) -> None:
    """A ``*.lock`` git or another command writes through (or a killed one left) stops a write.

    dulwich's ``FileLocked`` came out as a traceback.
    """
    lock = here / "config.lock"
    lock.write_text("")
    for args in (("remote", "add", "other", "/x"), ("remote", "remove", "origin")):
        line = _fails_and_changes_nothing(here, *args)
        assert "config.lock exists" in line and f"remove {lock}" in line, line
    lock.unlink()
    (here / "refs" / "tags").mkdir(exist_ok=True)
    (here / "refs" / "tags" / "v1.lock").write_text("")
    line = _fails_and_changes_nothing(here, "tag", "v1", "E1")
    assert "v1.lock exists" in line, line
    (here / "refs" / "tags" / "v1.lock").unlink()
    assert vml(here, "tag", "v1", "E1").code == 0  # and then it works
