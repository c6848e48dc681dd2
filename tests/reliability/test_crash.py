"""SIGKILL at chosen moments: earlier entries survive, an area is old, new or marked.

A child process runs a command with a progress callback that kills the
process (SIGKILL, no clean-up) at its n-th call, so the kill lands at a
known place inside the work.  ``tests/stress/run.py`` does the same at
random moments from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import digest_area, edit, make_area
from tests.reliability.helpers import ROOT, git_fsck, one_line_error, repo_state
from tests.reliability.helpers import vml_in_process as vml

_CHILD = """
import os, signal, sys
from pathlib import Path
from vml.plumbing.repository import open_repository
from vml.porcelain import checkout, commit
cmd, repo, n, *rest = sys.argv[1:]
calls = 0
def progress(phase, done, total):
    global calls
    calls += 1
    if calls == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
r = open_repository(Path(repo))
if cmd == "commit":
    commit.commit(r, Path(rest[0]), message="killed", progress=progress)
else:
    checkout.checkout(r, rest[0], Path(rest[1]), progress=progress)
"""


def killed(cmd: str, repo: Path, n: int, *args: str | Path) -> bool:
    """Run ``cmd`` in a child killed at its ``n``-th progress call; True if it was killed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, cmd, str(repo), str(n), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode in (0, -signal.SIGKILL), res.stderr
    return res.returncode == -signal.SIGKILL


def _state(area: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((area / ".vml" / "area.json").read_text())
    return doc


@pytest.fixture
def two_entries(tmp_path: Path, cli_repo: Path) -> tuple[Path, Path, Path]:
    """E1: disk.img + small files; E2 (another area): other.img + vm.vmx only."""
    a1 = tmp_path / "one"
    make_area(a1, disk=1 << 20)
    assert vml(cli_repo, "commit", "-q", a1).code == 0
    a2 = tmp_path / "two"
    a2.mkdir()
    (a2 / "vm.vmx").write_text("displayName = 'two'\n")
    (a2 / "other.img").write_bytes(os.urandom(300 << 10))
    assert vml(cli_repo, "commit", "-q", a2).code == 0
    return cli_repo, a1, a2


# Progress comes once per block read or written and once per run of holes:
# E1's disk is calls 1-5 of a checkout, 1-9 of the commit below.
@pytest.mark.parametrize("n", [1, 4, 6])
def test_killed_checkout_is_marked_and_resumes(
    tmp_path: Path, two_entries: tuple[Path, Path, Path], n: int
) -> None:
    repo, a1, _a2 = two_entries
    target = tmp_path / "target"
    assert killed("checkout", repo, n, "E1", target)
    assert _state(target)["pending"]
    st = vml(repo, "status", target)
    assert "interrupted checkout" in st.out
    run = vml(repo, "commit", target)
    assert run.code == 5 and "interrupted" in one_line_error(run)
    assert vml(repo, "checkout", "-q", "E1", target).code == 0
    assert digest_area(target) == digest_area(a1)
    assert _state(target)["pending"] is None
    git_fsck(repo)


def test_redo_after_a_killed_checkout_leaves_only_the_new_entry(
    tmp_path: Path, two_entries: tuple[Path, Path, Path]
) -> None:
    """Finishing with another entry must not keep the killed one's half-written files."""
    repo, _a1, a2 = two_entries
    target = tmp_path / "target"
    assert killed("checkout", repo, 3, "E1", target)  # inside disk.img
    assert vml(repo, "checkout", "-q", "E2", target).code == 0
    assert digest_area(target) == digest_area(a2)
    assert vml(repo, "status", target).out.strip().endswith("nothing changed")


@pytest.mark.parametrize("n", [1, 3, 9, 11])
def test_killed_commit_loses_nothing(two_entries: tuple[Path, Path, Path], n: int) -> None:
    repo, a1, _a2 = two_entries
    edit(a1 / "disk.img", 70_000, os.urandom(200_000))
    (a1 / "new file é.txt").write_text("new")
    before_refs, _ = repo_state(repo)
    state_before = _state(a1)
    assert killed("commit", repo, n, a1)
    assert repo_state(repo)[0] == before_refs
    assert _state(a1) == state_before
    git_fsck(repo)
    assert vml(repo, "commit", "-q", a1).code == 0
    assert vml(repo, "status", a1).out.strip().endswith("nothing changed")
