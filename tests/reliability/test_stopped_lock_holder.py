"""A command waiting for a lock says so at once, naming the holder and, if it is stopped, what to do.

The packs' lock is waited for up to 10 minutes, the repository's 30 s: a
holder stopped by SIGSTOP or Ctrl-Z (it never goes on by itself) made the
other command sit silent for that long, then say "wait for the other vml
command to finish", which cannot help.  Now the waiting command says, after
two seconds, which process holds the lock, that it is stopped, and how to
continue it; and goes on once it is continued.  The holder is a real
process, stopped for real while it holds the lock.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_area
from tests.reliability.helpers import ROOT
from tests.reliability.helpers import vml_in_process as vml
from vml.errors import RepositoryBusy
from vml.plumbing.repository import hold_flock

_HOLD = """
import os, signal, sys
from pathlib import Path
from vml.plumbing.keeps import pack_dir_lock
with pack_dir_lock(Path(sys.argv[1]) / "objects" / "pack"):
    print("held", flush=True)
    if sys.argv[2] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        sys.stdin.read()
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    assert vml(r, "init", "--block-size", "64K", r).code == 0
    make_area(tmp_path / "area")
    return r


def _holder(
    repo: Path, how: str, code: str = _HOLD, tail: tuple[str, ...] = ("vml", "gc")
) -> Iterator[subprocess.Popen[str]]:
    # argv ends "vml gc", as a real `vml gc`'s does: the holder is named by its command line
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(repo), how, *tail],
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        if how == "stop":
            deadline = time.monotonic() + 10
            while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
                assert time.monotonic() < deadline
                time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def stopped(repo: Path) -> Iterator[subprocess.Popen[str]]:
    yield from _holder(repo, "stop")


@pytest.fixture
def running(repo: Path) -> Iterator[subprocess.Popen[str]]:
    yield from _holder(repo, "run")


def test_a_commit_waiting_for_a_stopped_holder_says_so_and_goes_on_once_it_is_continued(
    tmp_path: Path, repo: Path, stopped: subprocess.Popen[str]
) -> None:
    saver = subprocess.Popen(
        [sys.executable, "-m", "vml", "-R", str(repo), "commit", "-q", str(tmp_path / "area")],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert saver.stderr is not None
        ready, _, _ = select.select([saver.stderr], [], [], 30)
        assert ready, "nothing said while waiting"
        line = saver.stderr.readline()
        pid = stopped.pid
        assert "packs are locked by another vml command" in line, line
        assert f"pid {pid}, `vml gc`, stopped" in line and f"kill -CONT {pid}" in line, line
        assert saver.poll() is None  # still waiting: it may be continued
        stopped.send_signal(signal.SIGCONT)  # the holder lets go and ends
        assert saver.wait(timeout=60) == 0, saver.stderr.read()
    finally:
        saver.kill()
        saver.wait()
    assert vml(repo, "log", "-q").code == 0
    assert (repo / "refs" / "vml" / "entries" / "1").exists()


def test_the_error_after_the_wait_names_a_stopped_holder_and_how_to_continue_it(
    repo: Path, stopped: subprocess.Popen[str]
) -> None:
    with (
        pytest.raises(RepositoryBusy) as err,
        hold_flock(repo / "vml" / "packs.lock", 0.2, "the packs are locked"),
    ):
        pass
    e = err.value
    assert e.message == f"the packs are locked (pid {stopped.pid}, `vml gc`, stopped)", e.message
    assert f"kill -CONT {stopped.pid}" in e.remedy and "or end it" in e.remedy, e.remedy


def test_a_running_holder_is_named_and_waited_for(
    repo: Path, running: subprocess.Popen[str]
) -> None:
    with (
        pytest.raises(RepositoryBusy) as err,
        hold_flock(repo / "vml" / "packs.lock", 0.2, "the packs are locked"),
    ):
        pass
    assert err.value.message == f"the packs are locked (pid {running.pid}, `vml gc`)"
    assert err.value.remedy == RepositoryBusy.default_remedy


def test_the_keeper_of_vml_run_is_named_as_such(repo: Path) -> None:
    # The keeper starts as `python -S -c CODE ...` where CODE imports
    # vml.plumbing.keeper (keeper._BOOT): no word of its command line is `vml`.
    from vml.plumbing.keeper import _BOOT

    holder = _holder(repo, "run", code=_HOLD + "\n# " + _BOOT, tail=("keep",))
    proc = next(holder)
    try:
        with (
            pytest.raises(RepositoryBusy) as err,
            hold_flock(repo / "vml" / "packs.lock", 0.2, "the packs are locked"),
        ):
            pass
        assert err.value.message == (
            f"the packs are locked (pid {proc.pid}, the keeper of `vml run`, "
            "keeping what the guest changed before it powered off)"
        ), err.value.message
    finally:
        holder.close()
