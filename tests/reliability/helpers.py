"""Helpers for the reliability tests: run the real CLI, snapshot folders, forge entries."""

from __future__ import annotations

import os
import subprocess
import sys
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
