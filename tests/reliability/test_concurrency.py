"""Concurrent use: no entry lost, unique numbers, clear "busy", locks die with their process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import digest_area, edit, make_area
from tests.reliability.helpers import ROOT, git_fsck, one_line_error, repo_state, vml
from tests.reliability.helpers import vml_in_process as vml_fast
from vml.errors import RepositoryBusy
from vml.plumbing.areas import lock_area
from vml.plumbing.repository import hold_flock, open_repository
from vml.porcelain.commit import commit

_LOOP = """
import os, sys
from pathlib import Path
from vml.plumbing.repository import open_repository
from vml.porcelain.commit import commit
repo, area, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    with open(area / "disk.img", "r+b") as f:
        f.seek(i * 70000)
        f.write(os.urandom(5000))
    r = open_repository(repo)
    commit(r, area, message=f"{area.name} {i}")
    r.close()
"""


def _child(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_areas_commit_to_one_repository_at_once(tmp_path: Path, cli_repo: Path) -> None:
    areas = [tmp_path / "a", tmp_path / "b"]
    for i, a in enumerate(areas):
        make_area(a, seed=i)
    gc = "gc" in vml_fast(cli_repo, "--help").out
    procs = [_child("-c", _LOOP, cli_repo, a, 4) for a in areas]
    # A gc running meanwhile (when the command exists) must not lose anything either.
    while gc and any(p.poll() is None for p in procs):
        run = vml(cli_repo, "gc", "-q")
        assert run.code in (0, 8), run.err
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    refs, _ = repo_state(cli_repo)
    numbers = sorted(int(r.rsplit("/", 1)[1]) for r in refs if r.startswith("refs/vml/entries/"))
    assert numbers == list(range(1, 9))  # every save has its own number, none lost
    assert len({refs[f"refs/vml/entries/{n}"] for n in numbers}) == 8
    git_fsck(cli_repo)
    for a in areas:  # each area's last entry rebuilds exactly
        out = tmp_path / f"out-{a.name}"
        repo = open_repository(cli_repo)
        try:
            from vml.plumbing.areas import load_state
            from vml.porcelain.checkout import checkout

            state = load_state(a)
            assert state is not None and state.entry
            checkout(repo, state.entry, out)
        finally:
            repo.close()
        assert digest_area(out) == digest_area(a)


def test_a_second_command_in_a_busy_area_is_refused(tmp_path: Path, cli_repo: Path) -> None:
    area = tmp_path / "area"
    make_area(area)
    assert vml_fast(cli_repo, "commit", "-q", area).code == 0
    edit(area / "disk.img", 0, b"unsaved")
    before = repo_state(cli_repo), digest_area(area)
    with lock_area(area):  # another vml command works in the area
        for args in (
            ["commit", area],
            ["checkout", "-f", "E1", area],
            ["restore", "-f", "E1", area],
        ):
            run = vml_fast(cli_repo, *args)
            assert run.code == 8, run
            assert "in use by another vml command" in one_line_error(run)
    assert (repo_state(cli_repo), digest_area(area)) == before


def test_two_checkouts_into_one_area(tmp_path: Path, cli_repo: Path) -> None:
    src = tmp_path / "src"
    make_area(src, disk=2 << 20)
    assert vml_fast(cli_repo, "commit", "-q", src).code == 0
    target = tmp_path / "target"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vml", "-R", str(cli_repo), "checkout", "-q", "E1", str(target)],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    # One wins; the other either ran after it (then found the area clean) or was told it is busy.
    assert codes in ([0, 0], [0, 8]), results
    for code, err in results:
        if code == 8:
            assert "in use by another vml command" in err
    assert digest_area(target) == digest_area(src)


_HOLD = """
import os, signal, sys
from pathlib import Path
from vml.plumbing.areas import lock_area
from vml.plumbing.repository import open_repository
repo = open_repository(Path(sys.argv[1]))
with lock_area(Path(sys.argv[2])), repo.lock():
    print("locked", flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_locks_die_with_a_killed_process(tmp_path: Path, cli_repo: Path) -> None:
    area = tmp_path / "area"
    make_area(area)
    assert vml_fast(cli_repo, "commit", "-q", area).code == 0
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(cli_repo), str(area)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(RepositoryBusy, match=f"pid {p.pid}"), lock_area(area):
        pass
    repo = open_repository(cli_repo)
    try:
        with (
            pytest.raises(RepositoryBusy, match="locked by another vml command"),
            repo.lock(timeout=0.2),
        ):
            pass
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(timeout=30) == -signal.SIGKILL
        # The lock files stay behind, naming a dead process; the locks do not.
        assert (area / ".vml" / "lock").read_text().strip() == str(p.pid)
        with lock_area(area), repo.lock(timeout=0):
            pass
    finally:
        repo.close()
    edit(area / "disk.img", 0, b"after the crash")
    assert vml_fast(cli_repo, "commit", "-q", area).code == 0


def test_a_commit_waits_for_the_repository_lock(tmp_path: Path, cli_repo: Path) -> None:
    """The repository lock is held only to move refs; a commit waits for it, then finishes."""
    area = tmp_path / "area"
    make_area(area)
    repo = open_repository(cli_repo)
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with hold_flock(cli_repo / "vml" / "lock", 0, "busy"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(30)
    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        res = commit(repo, area)
    finally:
        release.set()
        t.join()
        repo.close()
    assert res.entry == "E1"


def test_a_lock_file_names_its_holder_only_while_held(tmp_path: Path, cli_repo: Path) -> None:
    """A released lock leaves no pid behind: `vml stop` judges by that pid whether the keeper holds the area."""
    area = tmp_path / "area"
    make_area(area)
    assert vml_fast(cli_repo, "commit", "-q", area).code == 0  # its .vml lasts
    lock = tmp_path / "repo.lock"
    with hold_flock(lock, 0, "busy"):
        assert lock.read_text().split() == [str(os.getpid())]
    assert lock.read_text() == ""
    with lock_area(area):
        files = [p for p in (area / ".vml").iterdir() if p.is_file()]
        held = [p for p in files if p.read_text().strip() == str(os.getpid())]
        assert held, "the area lock names its holder"
    assert all(p.read_text() == "" for p in held)


# A process holding the area, as the keeper of `vml run` does once its guest
# powered itself off (keeper._keep: its lock names its pid; then it keeps the
# ranges under the area lock and ends QEMU), or as another command would.
_AREA_HOLDER = """
import fcntl, os, sys, time
from pathlib import Path
from vml.plumbing.areas import lock_area
from vml.plumbing.vm.qemu import RunPaths
area, as_keeper = Path(sys.argv[1]), sys.argv[2] == "keeper"
if as_keeper:
    RunPaths(area).keeper_lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(RunPaths(area).keeper_lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
with lock_area(area):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


@pytest.mark.parametrize("holder", ["keeper", "command"])
def test_commands_wait_for_the_keeper_and_not_for_another_command(
    tmp_path: Path, cli_repo: Path, holder: str
) -> None:
    """The keeper holds the area a moment after the guest powered off: a commit then waits.

    A script's `vml commit` right after the VM ended found the area "in use
    by another vml command"; any other holder is still refused at once.
    """
    area = tmp_path / "area"
    make_area(area)
    assert vml_fast(cli_repo, "commit", "-q", area).code == 0
    edit(area / "disk.img", 0, b"changed by the guest")
    proc = subprocess.Popen(
        [sys.executable, "-c", _AREA_HOLDER, str(area), holder, "0.8"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        run = vml_fast(cli_repo, "commit", "-q", area)
        still_held = proc.poll() is None
    finally:
        proc.wait(30)
    if holder == "keeper":
        assert run.code == 0, run
        assert (cli_repo / "refs" / "vml" / "entries" / "2").exists()
    else:
        assert still_held and run.code == 8, run
        assert "in use by another vml command" in one_line_error(run)
