"""Helpers for the reliability tests: run the real CLI, snapshot folders, forge entries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    """A finished vml process."""

    code: int
    out: str
    err: str


def vml_in_process(repo: Path, *args: str | Path) -> Run:
    """Run the CLI in this process (typer's runner): for tests that need no process of their own."""
    from typer.testing import CliRunner

    from vml.cli.root import app

    res = CliRunner().invoke(app, ["-R", str(repo), *map(str, args)])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Run(res.exit_code, res.stdout, res.stderr)


def vml(repo: Path, *args: str | Path, cwd: Path | None = None, timeout: float = 120) -> Run:
    """Run ``python3 -m vml -R repo ...`` as a real process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("VML_REPO", None)
    res = subprocess.run(
        [sys.executable, "-m", "vml", "-R", str(repo), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    return Run(res.returncode, res.stdout, res.stderr)


def one_line_error(run: Run) -> str:
    """The error a failed command printed: one line starting ``vml:``, no traceback."""
    assert run.code != 0, run
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert "Traceback" not in run.err, run.err
    assert len(lines) == 1 and lines[0].startswith("vml: "), run.err
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every path below ``folder``: (mode, size, content for files) — to prove nothing changed."""
    out: dict[str, tuple[int, int, bytes | None]] = {}
    if not folder.exists():
        return out
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in [*dirs, *names]:
            p = Path(root) / name
            if name == "lock" and p.parent.name == ".vml":
                continue  # rewritten with the pid of every command that takes the lock
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out[p.relative_to(folder).as_posix()] = (st.st_mode, st.st_size, data)
    return out


def repo_state(repo: Path) -> tuple[dict[str, str], list[str]]:
    """The repository's refs and pack/loose object files: what a refused command must not move."""
    refs = subprocess.run(
        ["git", "--git-dir", str(repo), "for-each-ref", "--format=%(refname) %(objectname)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = dict(line.split(" ")[::-1] for line in refs.splitlines())
    objects = sorted(
        p.relative_to(repo).as_posix() for p in (repo / "objects").rglob("*") if p.is_file()
    )
    return {v: k for k, v in table.items()}, objects


def git_fsck(repo: Path) -> None:
    """``git fsck --full --strict`` must pass."""
    res = subprocess.run(
        ["git", "--git-dir", str(repo), "fsck", "--full", "--strict", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


# Lock files any command touches, which a "nothing changed" comparison skips.
LOCK_FILES = ("vml/lock", "vml/packs.lock", "vml/maintenance.lock")


def repo_files(repo: Path) -> dict[str, bytes]:
    """Every file of the repository and its content, bar the lock files commands touch."""
    out: dict[str, bytes] = {}
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo).as_posix()
        if rel not in LOCK_FILES:
            out[rel] = p.read_bytes() if p.is_file() else b"<folder>"
    return out


class CuttingProxy:
    """A TCP proxy in front of a real server that cuts, or damages, what passes.

    ``cut``: the connection closes after the server sent the client that many
    bytes; ``flip``: the byte the server sends at that offset is changed;
    ``cut_up``: the connection closes after the client sent that many bytes.
    """

    def __init__(
        self,
        port: int,
        *,
        cut: int | None = None,
        flip: int | None = None,
        cut_up: int | None = None,
    ) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target, self.cut, self.flip, self.cut_up = port, cut, flip, cut_up
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            up = (client, upstream, self.cut_up, None, self.cut_up is not None)
            down = (upstream, client, self.cut, self.flip, self.cut_up is None)
            for args in (up, down):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    @staticmethod
    def _pump(
        src: socket.socket, dst: socket.socket, cut: int | None, flip: int | None, closes: bool
    ) -> None:
        """Copy ``src`` to ``dst``, cut or damaged; the direction that ``closes`` ends both."""
        sent = 0
        try:
            while data := src.recv(65536):
                if flip is not None and sent <= flip < sent + len(data):
                    i = flip - sent
                    data = data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :]
                if cut is not None and sent + len(data) >= cut:
                    dst.sendall(data[: cut - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        if closes:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        """Stop accepting connections."""
        self.server.close()
