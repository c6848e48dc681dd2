"""Sharing through real git servers on 127.0.0.1: git daemon, smart HTTP, ssh, mirrors (#6).

Loopback only: every server binds 127.0.0.1 on a free port and is stopped in
the fixture's teardown.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, edit, make_area, need, three_entries
from vml.plumbing import refs as refs_mod
from vml.plumbing.repository import Repository, init_repository, open_repository
from vml.porcelain import clone as clone_mod
from vml.porcelain import fetch as fetch_mod
from vml.porcelain import log as log_mod
from vml.porcelain import names as names_mod
from vml.porcelain import pull as pull_mod
from vml.porcelain import push as push_mod
from vml.porcelain import remote as remote_mod
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit

pytestmark = pytest.mark.compat
ROOT = Path(__file__).resolve().parents[2]


def digest(area: Path) -> dict[str, str]:
    return {
        str(p.relative_to(area)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(area.rglob("*"))
        if p.is_file() and ".vml" not in p.relative_to(area).parts
    }


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def fsck(path: Path) -> None:
    git("fsck", "--full", "--strict", "--no-progress", cwd=path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    for _ in range(400):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def served_bare(root: Path, name: str) -> Path:
    path = root / name
    git("init", "-q", "--bare", str(path))
    git("config", "http.receivepack", "true", cwd=path)
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``git daemon`` with receive-pack on 127.0.0.1: (base URL, served folder)."""
    need("git")
    root = tmp_path / "srv-daemon"
    root.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--listen=127.0.0.1",
            f"--port={port}",
            f"--base-path={root}",
            "--export-all",
            "--enable=receive-pack",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        yield f"git://127.0.0.1:{port}", root
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class _GitCGI(http.server.BaseHTTPRequestHandler):
    """Smart HTTP: each request runs ``git http-backend`` as a CGI program."""

    root = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _run(self) -> None:
        body = self._body() if self.command == "POST" else b""
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        res = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        head, _, payload = res.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = res.stdout.partition(b"\n\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").splitlines():
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _run
    do_POST = _run


@pytest.fixture
def http_git(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Smart HTTP (``git http-backend`` behind a local CGI server): (base URL, served folder)."""
    need("git")
    root = tmp_path / "srv-http"
    root.mkdir()
    handler = type("Handler", (_GitCGI,), {"root": str(root)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def alice(tmp_path: Path) -> Repository:
    """E1 full <- E2 incremental, E3 differential from E1; branch main at E2, tag golden."""
    r = three_entries(tmp_path / "alice", tmp_path / "a-area")
    names_mod.create_branch(r, "main", "E2", tmp_path / "nowhere")
    names_mod.create_tag(r, "golden", "E1", tmp_path / "nowhere")
    return r


def same_entries(a: Repository, b: Repository, tmp: Path) -> None:
    """Every entry of ``a`` exists in ``b`` and builds byte-identical."""
    nb = {c: n for n, c in refs_mod.read_refs(b).entries.items()}
    for n, c in sorted(refs_mod.read_refs(a).entries.items()):
        checkout(a, f"E{n}", tmp / f"x-a{n}")
        checkout(b, f"E{nb[c]}", tmp / f"x-b{n}")
        assert digest(tmp / f"x-a{n}") == digest(tmp / f"x-b{n}")


def round_trip(alice: Repository, base: str, root: Path, tmp: Path) -> None:
    served = served_bare(root, "lab.git")
    url = f"{base}/lab.git"
    remote_mod.add(alice, "origin", url)
    seen: list[tuple[str, int, int]] = []
    pushed = push_mod.push(alice, all_entries=True, tags=True, progress=lambda *a: seen.append(a))
    assert pushed.entries == ["E1", "E2", "E3"] and pushed.branches == {"main": "E2"}
    assert pushed.objects > 0 and pushed.size > 0
    assert ("objects", pushed.objects, pushed.objects) in seen
    fsck(served)

    cl = clone_mod.clone(url, tmp / "bob", progress=lambda *a: seen.append(a))
    assert cl.fetch.objects > 0 and cl.branches == ["main"]
    bob = open_repository(tmp / "bob")
    same_entries(alice, bob, tmp)
    assert {c for c in refs_mod.read_refs(bob).entries.values()} == set(
        refs_mod.read_refs(alice).entries.values()
    )

    # bob works on main and pushes the branch back; alice fetches and pulls it
    area = tmp / "b-work"
    checkout(bob, "main", area)
    edit(area / "disk.img", 100_000, b"bob" * 1000)
    made = commit(bob, area, message="bob on main")
    res = push_mod.push(bob, names=["main"])
    assert res.branches == {"main": made.entry}
    assert res.objects < pushed.objects  # only what the server lacks travels
    pr = pull_mod.pull(alice)
    assert [e.commit for e in pr.fetch.new_entries] == [made.commit]
    assert pr.moved == {"main": pr.fetch.new_entries[0].entry}
    got = log_mod.log(alice).entries[pr.fetch.new_entries[0].entry]
    assert got.remote == "origin" and got.message == "bob on main"
    same_entries(bob, alice, tmp / "back")
    for p in (alice.path, bob.path, served):
        fsck(p)
    bob.close()


def test_git_daemon_push_clone_push_back_fetch(
    alice: Repository, daemon: tuple[str, Path], tmp_path: Path
) -> None:
    round_trip(alice, daemon[0], daemon[1], tmp_path)


def test_smart_http_push_clone_push_back_fetch(
    alice: Repository, http_git: tuple[str, Path], tmp_path: Path
) -> None:
    round_trip(alice, http_git[0], http_git[1], tmp_path)


def test_ssh_url_through_the_ssh_command(alice: Repository, tmp_path: Path) -> None:
    """ssh:// goes through the configured ssh program (here one that runs git locally)."""
    fake = tmp_path / "fake-ssh"
    fake.write_text(
        '#!/bin/sh\n# last argument is the git command\nfor a; do cmd="$a"; done\nexec sh -c "$cmd"\n'
    )
    fake.chmod(0o755)
    served = served_bare(tmp_path, "lab.git")
    url = f"ssh://vml@127.0.0.1{served}"
    remote_mod.add(alice, "lab", url)
    push_mod.push(alice, "lab", ["E3"], ssh_command=str(fake))
    cl = clone_mod.clone(url, tmp_path / "bob", ssh_command=str(fake))
    assert [e.entry for e in cl.fetch.new_entries] == ["E1", "E2"]
    bob = open_repository(tmp_path / "bob")
    checkout(bob, "E2", tmp_path / "b3")
    checkout(alice, "E3", tmp_path / "a3")
    assert digest(tmp_path / "b3") == digest(tmp_path / "a3")
    bob.close()


PUSH_AND_DIE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from vml.plumbing.repository import open_repository
    from vml.porcelain.push import push

    repo = open_repository(Path(sys.argv[2]))
    def progress(phase, done, total):
        if phase == "objects" and done >= int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # a kill mid-way through the pack
    push(repo, all_entries=True, progress=progress)
    """
)


def test_killed_push_leaves_both_sides_valid_and_resumes(
    alice: Repository, daemon: tuple[str, Path], tmp_path: Path
) -> None:
    served = served_bare(daemon[1], "lab.git")
    remote_mod.add(alice, "origin", f"{daemon[0]}/lab.git")
    before = git("for-each-ref", cwd=alice.path)
    proc = subprocess.run(
        [sys.executable, "-c", PUSH_AND_DIE, str(ROOT), str(alice.path), "5"],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # the server kept no refs from the half push; both sides are valid
    assert git("for-each-ref", cwd=served) == ""
    assert git("for-each-ref", cwd=alice.path) == before
    fsck(served)
    fsck(alice.path)
    # repeating the push completes it
    res = push_mod.push(alice, all_entries=True)
    assert res.entries == ["E1", "E2", "E3"]
    fsck(served)
    clone_mod.clone(f"{daemon[0]}/lab.git", tmp_path / "bob")
    bob = open_repository(tmp_path / "bob")
    same_entries(alice, bob, tmp_path)
    bob.close()


def test_git_mirrors_are_vml_repositories(alice: Repository, tmp_path: Path) -> None:
    # git clone --mirror: a working VML repository with the origin's numbers
    git("clone", "-q", "--mirror", str(alice.path), str(tmp_path / "mirror"))
    mirror = open_repository(tmp_path / "mirror")
    assert refs_mod.read_refs(mirror).entries == refs_mod.read_refs(alice).entries
    assert {le.id for le in log_mod.log(mirror).entries.values()} == {"E1", "E2", "E3"}
    same_entries(alice, mirror, tmp_path / "m")
    mirror.close()

    # git push --mirror to a bare repository, then vml clone it back
    served = tmp_path / "pushed.git"
    git("init", "-q", "--bare", str(served))
    git("push", "-q", "--mirror", str(served), cwd=alice.path)
    cl = clone_mod.clone(str(served), tmp_path / "bob")
    assert cl.block_size == TEST_BLOCK
    bob = open_repository(tmp_path / "bob")
    assert refs_mod.read_refs(bob).entries == refs_mod.read_refs(alice).entries
    assert refs_mod.read_refs(bob).branches == refs_mod.read_refs(alice).branches
    assert refs_mod.read_refs(bob).tags == refs_mod.read_refs(alice).tags
    same_entries(alice, bob, tmp_path / "b")
    assert log_mod.log(bob).entries["E2"].remote == "origin E2"
    fsck(bob.path)
    bob.close()
    shutil.rmtree(tmp_path / "b")


def test_a_mirror_saves_an_unchanged_image_of_another_block_size(tmp_path: Path) -> None:
    """A mirror has no vml.blockSize: an image left unchanged keeps the entries' own."""
    origin = init_repository(tmp_path / "origin", TEST_BLOCK)
    make_area(tmp_path / "area", disk=4 << 20)
    commit(origin, tmp_path / "area")
    origin.close()
    git("clone", "-q", "--mirror", str(tmp_path / "origin"), str(tmp_path / "mirror"))
    mirror = open_repository(tmp_path / "mirror")
    assert mirror.block_size != TEST_BLOCK
    work = tmp_path / "work"
    checkout(mirror, "E1", work)
    (work / "vm.vmx").write_text('displayName = "edited in the mirror"\n')  # the disk unchanged
    saved = commit(mirror, work)
    checkout(mirror, saved.entry, tmp_path / "check")
    assert digest(tmp_path / "check") == digest(work)
    fsck(mirror.path)
    mirror.close()


def test_fetch_one_entry_over_the_daemon(
    alice: Repository, daemon: tuple[str, Path], tmp_path: Path
) -> None:
    # the daemon serves alice's repository itself
    shutil.copytree(alice.path, daemon[1] / "alice.git")
    bob = init_repository(tmp_path / "bob", TEST_BLOCK)
    remote_mod.add(bob, "alice", f"{daemon[0]}/alice.git")
    res = fetch_mod.fetch(bob, "alice", ["E3"])
    assert [(e.entry, e.remote_entry) for e in res.new_entries] == [("E1", "E1"), ("E2", "E3")]
    e2 = refs_mod.read_refs(alice).entries[2].hex().encode()
    assert e2 not in bob.git.object_store  # the sibling's chain did not travel
    checkout(bob, "E2", tmp_path / "b")
    checkout(alice, "E3", tmp_path / "a")
    assert digest(tmp_path / "b") == digest(tmp_path / "a")
    fsck(bob.path)
    bob.close()


FETCH_AND_DIE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from vml.plumbing.repository import open_repository
    from vml.porcelain.fetch import fetch

    repo = open_repository(Path(sys.argv[2]))
    def progress(phase, done, total):
        if phase == "bytes" and done > 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a kill while the pack arrives
    fetch(repo, progress=progress)
    """
)


def test_killed_fetch_names_nothing_and_resumes(
    alice: Repository, http_git: tuple[str, Path], tmp_path: Path
) -> None:
    served_bare(http_git[1], "lab.git")
    url = f"{http_git[0]}/lab.git"
    remote_mod.add(alice, "origin", url)
    push_mod.push(alice, all_entries=True)
    bob = init_repository(tmp_path / "bob", TEST_BLOCK)
    remote_mod.add(bob, "origin", url)
    proc = subprocess.run(
        [sys.executable, "-c", FETCH_AND_DIE, str(ROOT), str(bob.path)],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert refs_mod.read_refs(bob).entries == {}
    fsck(bob.path)
    res = fetch_mod.fetch(bob)
    assert [e.entry for e in res.new_entries] == ["E1", "E2", "E3"]
    same_entries(alice, bob, tmp_path)
    fsck(bob.path)
    bob.close()
