"""A fetch or pull stopped while it moves refs: all of them or none, and the same command completes.

A fetch moves many refs after its pack arrived: the E-numbers of the entries
that are new here, the refs tracking the remote, new tags, the tracking refs
of branches the remote dropped.  Before, each moved on its own: a git
``*.lock`` file in the way of one (another git or vml command writing it,
or one killed while it did) stopped the fetch with some tracking refs moved,
some entries numbered and others not; and where the entries came from
(``vml/origins.json``) was written after their numbers, so a fetch killed
between the two left entries that no later fetch gave an origin.

Now every ref's lock is taken before any ref moves (a lock in the way moves
nothing), the origins are written before the numbers, and a real SIGKILL
before each rename the fetch makes into the repository leaves a repository
every command uses, which the same fetch then completes: with the numbers,
origins and tracking refs of a fetch never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import edit, make_area
from tests.reliability.helpers import ROOT, git_fsck, one_line_error
from tests.reliability.helpers import vml as vml_process
from tests.reliability.helpers import vml_in_process as vml
from vml.plumbing.repository import Repository, hold_flock

_LOCKS = ("vml/lock", "vml/packs.lock", "vml/maintenance.lock")


def _refs(repo: Path) -> dict[str, str]:
    out = subprocess.run(
        ["git", "--git-dir", str(repo), "for-each-ref", "--format=%(refname) %(objectname)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split(" ") for line in out.splitlines())


def _state(repo: Path) -> dict[str, object]:
    """What a refused fetch must leave as it was: refs and VML's own files."""
    vml_files = {
        p.relative_to(repo).as_posix(): p.read_bytes()
        for p in sorted((repo / "vml").rglob("*"))
        if p.is_file() and p.relative_to(repo).as_posix() not in _LOCKS
    }
    return {"refs": _refs(repo), "vml": vml_files}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """E1 <- E2 <- E3 of one area; branch main at E3, tag v1 at E2."""
    repo = tmp_path / "src.git"
    assert vml(repo, "init", "--block-size", "64K", repo).code == 0
    area = tmp_path / "a"
    make_area(area, seed=1)
    for i in range(3):
        edit(area / "disk.img", 100_000 * i, os.urandom(20_000))
        assert vml(repo, "commit", "-q", "-m", f"state {i}", area).code == 0
    assert vml(repo, "branch", "main", "E3").code == 0
    assert vml(repo, "tag", "v1", "E2").code == 0
    return repo


@pytest.fixture
def here(tmp_path: Path, source: Path) -> Path:
    """A repository with an entry of its own (E1) and remote origin at the source."""
    repo = tmp_path / "here.git"
    assert vml(repo, "init", "--block-size", "64K", repo).code == 0
    make_area(tmp_path / "b", seed=2)
    assert vml(repo, "commit", "-q", tmp_path / "b").code == 0
    assert vml(repo, "remote", "add", "origin", source).code == 0
    return repo


def _numbers(repo: Path) -> dict[str, str]:
    """commit -> E-number."""
    return {r["commit"]: r["id"] for r in json.loads(vml(repo, "log", "--json").out)}


def _remotes(repo: Path) -> dict[str, str]:
    """E-number -> where it came from, as `vml log` says."""
    return {r["id"]: r.get("remote", "") for r in json.loads(vml(repo, "log", "--json").out)}


# Locks another command may hold: a tracking ref (not the first the fetch moves), the
# E-number its second new entry gets here, a tag it creates, packed-refs.
HELD = [
    "refs/vml/remotes/origin/entries/2",
    "refs/vml/entries/3",
    "refs/tags/v1",
    "refs/remotes/origin/main",
]


@pytest.mark.parametrize("held", HELD)
@pytest.mark.parametrize("command", ["fetch", "pull"])
def test_a_ref_lock_in_the_way_moves_no_ref(here: Path, held: str, command: str) -> None:
    """Refused in one line naming the lock and how to clear it; no ref, number or origin moved."""
    lock = here / f"{held}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    before = _state(here)
    line = one_line_error(vml(here, command))
    assert f"{held}.lock exists" in line and f"remove {lock}" in line, line
    assert _state(here) == before
    git_fsck(here)
    assert vml(here, "fsck").code == 0
    lock.unlink()
    run = vml(here, command)  # and then the same command completes
    assert run.code == 0, run
    assert sorted(_numbers(here).values()) == ["E1", "E2", "E3", "E4"]
    assert {_remotes(here)[e] for e in ("E2", "E3", "E4")} == {
        "origin E1",
        "origin E2",
        "origin E3",
    }
    git_fsck(here)


def test_a_packed_refs_lock_stops_a_prune_of_packed_tracking_refs(here: Path, source: Path) -> None:
    """A tracking ref to delete sits in packed-refs, whose lock is held: nothing moves."""
    assert vml(here, "fetch").code == 0
    subprocess.run(["git", "--git-dir", str(here), "pack-refs", "--all"], check=True)
    assert vml(source, "branch", "-d", "main").code == 0  # the remote drops its branch
    assert vml(source, "tag", "v2", "E3").code == 0
    (here / "packed-refs.lock").write_text("")
    before = _state(here)
    line = one_line_error(vml(here, "fetch"))
    assert "packed-refs.lock exists" in line, line
    assert _state(here) == before
    (here / "packed-refs.lock").unlink()
    assert vml(here, "fetch").code == 0
    refs = _refs(here)
    assert "refs/remotes/origin/main" not in refs and "refs/tags/v2" in refs
    git_fsck(here)


def test_a_fetch_that_waited_in_vain_for_the_repository_lock_moves_nothing(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another vml holds the repository lock past the wait: one line, exit 8, no ref moved."""
    monkeypatch.setattr(Repository.lock.__wrapped__, "__defaults__", (0.5, "repository"))  # type: ignore[attr-defined]
    before = _state(here)
    with hold_flock(here / "vml" / "lock", 5, "a test"):
        run = vml(here, "fetch")
    line = one_line_error(run)
    assert run.code == 8 and "locked by another vml command" in line, line
    assert _state(here) == before
    git_fsck(here)
    assert vml(here, "fetch").code == 0
    assert sorted(_numbers(here).values()) == ["E1", "E2", "E3", "E4"]


# A fetch that dies (SIGKILL) before the ``stop``-th rename into the repository:
# a pack's files, its .keep, refs, origins.json, last-entry-number.
_CHILD = """
import os, signal, sys
stop, repo = int(sys.argv.pop(1)), os.path.realpath(sys.argv.pop(1))
count = os.path.join(os.path.dirname(repo), "renames")
seen = 0

def counted(real):
    def rename(src, dst, *a, **k):
        global seen
        if os.path.realpath(os.fsdecode(dst)).startswith(repo + os.sep):
            if seen == stop:
                os.kill(os.getpid(), signal.SIGKILL)
            seen += 1
            with open(count, "w") as f:
                f.write(str(seen))
        return real(src, dst, *a, **k)
    return rename

os.replace, os.rename = counted(os.replace), counted(os.rename)
from vml.cli.app import main
sys.argv[0] = "vml"
main()
"""


def _killed_fetch(repo: Path, stop: int) -> int:
    """Run `vml fetch` in ``repo``, killed before its ``stop``-th rename; its exit code."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-c", _CHILD, str(stop), str(repo), "-R", str(repo), "fetch"]
    res = subprocess.run(args, env=env, capture_output=True, text=True)
    assert res.returncode in (0, -signal.SIGKILL), res.stderr
    return res.returncode


def _complete(repo: Path) -> None:
    """Run the same fetch again until done; a lock file the killed one left is named and removed."""
    for _ in range(10):
        run = vml(repo, "fetch")
        if run.code == 0:
            return
        line = one_line_error(run)
        assert run.code == 8 and ".lock exists" in line, line
        lock = Path(line.rsplit("remove ", 1)[1].split(" ")[0].rstrip(")"))
        assert lock.name.endswith(".lock") and lock.is_relative_to(repo), line
        lock.unlink()
    raise AssertionError("the fetch never completed")


def test_a_fetch_killed_before_each_rename_is_completed_by_the_same_fetch(
    tmp_path: Path, here: Path
) -> None:
    """Every instant: the repository is valid and usable, and a re-run ends where a whole fetch does."""
    template = tmp_path / "template.git"
    shutil.copytree(here, template, symlinks=True)
    assert _killed_fetch(here, 1 << 30) == 0  # never killed: the count and the outcome
    renames = int((tmp_path / "renames").read_text())
    assert renames >= 8  # pack, .keep, origins, three E-numbers, tracking refs, tag, ...
    numbers, remotes, refs = _numbers(here), _remotes(here), _refs(here)
    assert sorted(numbers.values()) == ["E1", "E2", "E3", "E4"]
    for stop in range(renames):
        repo = tmp_path / f"killed-{stop}.git"
        shutil.copytree(template, repo, symlinks=True)
        assert _killed_fetch(repo, stop) == -signal.SIGKILL
        git_fsck(repo)
        fsck = vml(repo, "fsck")
        assert fsck.code == 0, (stop, fsck.out, fsck.err)
        log = _numbers(repo)  # every command reads it; an entry shown has its origin
        assert set(log.items()) <= set(numbers.items()), stop
        for e in log.values():
            assert _remotes(repo)[e] == remotes[e], (stop, e)
        _complete(repo)
        assert _numbers(repo) == numbers, stop
        assert _remotes(repo) == remotes, stop
        assert _refs(repo) == refs, stop
        git_fsck(repo)
        assert vml(repo, "gc").code == 0
        assert vml(repo, "verify", "--all", "--read-data").code == 0, stop
        shutil.rmtree(repo)


@pytest.mark.parametrize("held", ["refs/tags/golden", "refs/heads/dev"])
def test_a_save_whose_tag_or_branch_is_locked_makes_no_entry(tmp_path: Path, held: str) -> None:
    """`vml commit --tag` or a save on a branch: the entry, its tag and its branch move as one.

    Before, the entry ref was made and the tag or branch then failed on its
    lock: the command failed (exit 8) with an entry the area did not name.
    """
    repo = tmp_path / "r.git"
    area = tmp_path / "a"
    assert vml(repo, "init", "--block-size", "64K", repo).code == 0
    make_area(area)
    assert vml(repo, "commit", "-q", area).code == 0
    assert vml_process(repo, "branch", "dev", "E1", cwd=area).code == 0  # the area follows dev
    edit(area / "disk.img", 5000, b"changed")
    lock = repo / f"{held}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    before = _state(repo)
    state = (area / ".vml" / "area.json").read_bytes()
    line = one_line_error(vml(repo, "commit", "--tag", "golden", area))
    assert f"{held}.lock exists" in line, line
    assert _state(repo) == before and (area / ".vml" / "area.json").read_bytes() == state
    git_fsck(repo)
    lock.unlink()
    assert vml(repo, "commit", "-q", "--tag", "golden", area).code == 0
    refs = _refs(repo)
    assert refs["refs/tags/golden"] == refs["refs/vml/entries/2"] == refs["refs/heads/dev"]
