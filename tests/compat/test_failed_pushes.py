"""A `vml push` that fails: one line with a remedy, non-zero exit, nothing changed here, and
on the remote nothing (or a valid state): `git fsck --full --strict` passes, no ref half moved.

Every failure is real: a `git daemon` whose hook refuses a ref, whose ref is
locked, whose disk fills up, whose connection a proxy cuts mid-pack, that
does not accept pushes; a plain git repository; a smart-HTTP server that
refuses the credentials.  Before, a hook or a lock refusing one ref left the
others moved on the remote (receive-pack moves each on its own unless the
push is atomic), a plain git repository took the entries, and a server that
died mid-pack was "cannot reach ...; check the URL and the network".
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat.test_sharing_servers import _GitCGI, daemon, served_bare  # noqa: F401
from tests.conftest import edit, make_area, need
from tests.reliability.helpers import CuttingProxy, git_fsck, one_line_error, repo_files
from tests.reliability.helpers import vml_in_process as vml

pytestmark = pytest.mark.compat


def _refs(repo: Path) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(repo), "for-each-ref"], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def alice(tmp_path: Path) -> Path:
    """E1 <- E2 with ~300 KiB of data; branch main at E2."""
    repo = tmp_path / "alice.git"
    assert vml(repo, "init", "--block-size", "64K", repo).code == 0
    area = tmp_path / "a"
    make_area(area, seed=3)
    edit(area / "disk.img", 0, os.urandom(300_000))  # incompressible: the pack is as big
    assert vml(repo, "commit", "-q", area).code == 0
    edit(area / "disk.img", 400_000, b"y" * 5000)
    assert vml(repo, "commit", "-q", area).code == 0
    assert vml(repo, "branch", "main", "E2").code == 0
    return repo


def _fails_here_unchanged(alice: Path, *args: str) -> str:
    before = repo_files(alice)
    line = one_line_error(vml(alice, "push", *args))
    assert repo_files(alice) == before, line
    return line


def _aim(alice: Path, url: str) -> None:
    vml(alice, "remote", "remove", "origin")
    assert vml(alice, "remote", "add", "origin", url).code == 0


def _pushes_then(alice: Path, served: Path) -> None:
    """Once the cause is gone, the same push completes and the remote is valid."""
    run = vml(alice, "push", "--all")
    assert run.code == 0, run
    assert "refs/heads/main" in _refs(served) and _refs(served).count("refs/vml/shared/") == 2
    git_fsck(served)


def test_a_hook_refusing_one_ref_moves_none(alice: Path, daemon: tuple[str, Path]) -> None:  # noqa: F811
    served = served_bare(daemon[1], "lab.git")
    hook = served / "hooks" / "update"
    hook.write_text(
        '#!/bin/sh\ncase "$1" in refs/heads/*) echo "no branches here" >&2; exit 1;; esac\n'
    )
    hook.chmod(0o755)
    _aim(alice, f"{daemon[0]}/lab.git")
    line = _fails_here_unchanged(alice, "--all")
    assert "refused refs/heads/main" in line and "moved no ref" in line, line
    assert "administrator" in line, line
    assert _refs(served) == ""  # atomic: not even the entries' refs
    git_fsck(served)
    hook.unlink()
    _pushes_then(alice, served)


def test_a_locked_ref_on_the_remote_moves_none(alice: Path, daemon: tuple[str, Path]) -> None:  # noqa: F811
    served = served_bare(daemon[1], "lab.git")
    _aim(alice, f"{daemon[0]}/lab.git")
    lock = served / "refs" / "heads" / "main.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    line = _fails_here_unchanged(alice, "--all")
    assert "main.lock" in line and "run the push again later" in line, line
    assert _refs(served) == ""
    git_fsck(served)
    lock.unlink()
    _pushes_then(alice, served)


def test_a_plain_git_repository_is_refused_before_anything_travels(
    alice: Path,
    daemon: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    work = tmp_path / "code"
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    (work / "f").write_text("code\n")
    subprocess.run(["git", "-C", str(work), "add", "f"], check=True)
    subprocess.run(
        ["git", "-C", str(work), "-c", "user.name=a", "-c", "user.email=b@c", "commit", "-qm", "x"],
        check=True,
    )
    served = daemon[1] / "code.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(served)], check=True)
    before = repo_files(served)
    _aim(alice, f"{daemon[0]}/code.git")
    line = _fails_here_unchanged(alice, "--all")
    assert "no VML entries" in line and "nothing was sent" in line, line
    assert repo_files(served) == before


def test_a_server_that_does_not_accept_pushes(alice: Path, tmp_path: Path) -> None:
    from tests.compat.test_sharing_servers import free_port, wait_for_port

    need("git")
    root = tmp_path / "ro"
    served = served_bare(root, "lab.git")
    port = free_port()
    proc = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={port}",
         f"--base-path={root}", "--export-all", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc)
        _aim(alice, f"git://127.0.0.1:{port}/lab.git")
        line = _fails_here_unchanged(alice, "--all")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "accepts pushes" in line and "fetch the entries" not in line, line
    assert _refs(served) == ""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 200 KiB tmpfs: smaller than what the push sends."""
    where = tmp_path / "small"
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(where)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_remote_whose_disk_fills_up_moves_no_ref(
    alice: Path,
    daemon: tuple[str, Path],  # noqa: F811
    small_disk: Path,
) -> None:
    served = daemon[1] / "lab.git"
    served.symlink_to(small_disk)
    subprocess.run(["git", "init", "-q", "--bare", str(small_disk)], check=True)
    _aim(alice, f"{daemon[0]}/lab.git")
    line = _fails_here_unchanged(alice, "--all")
    assert "moved no ref" in line and "disk space" in line, line
    assert "cannot reach" not in line, line
    assert _refs(small_disk) == ""
    git_fsck(small_disk)


@pytest.mark.parametrize("cut", [2_000, 100_000, 250_000])
def test_a_connection_cut_mid_pack_moves_no_ref(
    alice: Path,
    daemon: tuple[str, Path],  # noqa: F811
    cut: int,
) -> None:
    served = served_bare(daemon[1], "lab.git")
    port = int(daemon[0].rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_up=cut)
    try:
        _aim(alice, f"git://127.0.0.1:{proxy.port}/lab.git")
        line = _fails_here_unchanged(alice, "--all")
    finally:
        proxy.close()
    assert "moved no ref" in line or "broke" in line, line
    assert _refs(served) == ""
    git_fsck(served)
    _aim(alice, f"{daemon[0]}/lab.git")
    _pushes_then(alice, served)


class _Refusing(_GitCGI):
    """Smart HTTP that wants credentials it never accepts."""

    def _run(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="lab"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = _run
    do_POST = _run


def test_credentials_the_server_refuses(alice: Path, tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _aim(alice, f"http://someone:wrong@127.0.0.1:{server.server_address[1]}/lab.git")
        line = _fails_here_unchanged(alice, "--all")
    finally:
        server.shutdown()
        server.server_close()
    assert "refused the credentials" in line, line


def test_a_locked_ref_in_a_local_repository_moves_none(alice: Path, tmp_path: Path) -> None:
    """A path remote is written in this process, ref by ref: a lock in the way refuses it first."""
    served = served_bare(tmp_path, "lab.git")
    _aim(alice, str(served))
    table = subprocess.run(
        ["git", "--git-dir", str(alice), "rev-parse", "refs/vml/entries/2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lock = served / "refs" / "vml" / "shared" / f"{table}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    before = repo_files(served)
    line = _fails_here_unchanged(alice, "--all")
    assert f"refs/vml/shared/{table} is being written" in line and str(lock) in line, line
    assert repo_files(served) == before  # not even the objects
    lock.unlink()
    _pushes_then(alice, served)


def test_a_local_vml_repository_another_vml_holds_is_waited_for(
    alice: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its lock held past the wait (a `vml gc` there, say): one line, exit 8, nothing written."""
    from vml.plumbing.repository import Repository, hold_flock

    target = tmp_path / "shared.git"
    assert vml(target, "init", "--block-size", "64K", target).code == 0
    _aim(alice, str(target))
    monkeypatch.setattr(Repository.lock.__wrapped__, "__defaults__", (0.5, "repository"))  # type: ignore[attr-defined]
    before = repo_files(target)
    with hold_flock(target / "vml" / "lock", 5, "a test"):
        line = _fails_here_unchanged(alice, "--all")
    assert "remote repository" in line and "locked by another vml command" in line, line
    assert {k: v for k, v in repo_files(target).items() if k != "vml/lock"} == {
        k: v for k, v in before.items() if k != "vml/lock"
    }
    _pushes_then(alice, target)


def test_a_push_into_a_local_repository_makes_its_pack_durable_before_any_ref(
    alice: Path, tmp_path: Path
) -> None:
    """dulwich wrote a local push's pack without an fsync and then its refs: watched with strace."""
    import os
    import sys

    from tests.reliability.helpers import ROOT

    need("strace")
    target = tmp_path / "shared.git"
    assert vml(target, "init", "--block-size", "64K", target).code == 0
    _aim(alice, str(target))
    log = tmp_path / "strace.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        ["strace", "-f", "-y", "-o", str(log), "-e", "trace=fsync,rename,renameat,renameat2",
         sys.executable, "-m", "vml", "-R", str(alice), "push", "--all"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    calls = [ln for ln in log.read_text().splitlines() if str(target) in ln and "= 0" in ln]
    refs = [i for i, c in enumerate(calls) if "rename" in c and "/refs/" in c]
    packs = [i for i, c in enumerate(calls) if "fsync" in c and re.search(r"pack-\w+\.pack>", c)]
    folder = [i for i, c in enumerate(calls) if "fsync" in c and c.endswith("objects/pack>) = 0")]
    assert refs and packs and folder, calls
    assert max(packs) < min(refs) and max(folder[:1]) < min(refs), calls
    git_fsck(target)
