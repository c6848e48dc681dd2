"""The files VML writes into an area for good are durable: data fsynced, renamed, folder fsynced.

A VM's description (`vml vm init`, `<name>.qemu.json`) was renamed into
place without either fsync, and a live save's resume file (`<name>.resume.json`)
written in place: a power loss could leave them empty or cut, and `vml run`
and `vml commit` then read no VM.  Watched with strace on real processes:
each file's data reaches the disk before its name does, and the rename
before the writer goes on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need
from tests.reliability.helpers import ROOT


def _syscalls(area: Path, *args: str) -> list[str]:
    """The fsync and rename calls ``python ARGS`` makes in ``area`` (strace -y names fds)."""
    log = area.parent / "strace.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        [
            "strace", "-f", "-y", "-o", str(log),
            "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
            sys.executable, *args,
        ],
        env=env,
        check=True,
        capture_output=True,
    )  # fmt: skip
    where = str(area.resolve())
    return [ln for ln in log.read_text().splitlines() if where in ln and "= 0" in ln]


_RESUME = """
import sys
from pathlib import Path
from vml.plumbing.vm.resume import ResumeInfo
ResumeInfo("qmp", "vm.migstream", sys.argv[1], "2026-01-01").write(Path(sys.argv[1], "vm.resume.json"))
"""


@pytest.mark.parametrize("what", ["description", "resume file"])
def test_files_written_into_an_area_are_durable(tmp_path: Path, what: str) -> None:
    need("strace")
    area = tmp_path / "area"
    area.mkdir()
    (area / "disk.img").write_bytes(bytes(1 << 16))
    if what == "description":
        calls = _syscalls(
            area, "-m", "vml", "vm", "init", str(area), "--disk", str(area / "disk.img")
        )
        desc = f"{area.name}.qemu.json"
    else:
        calls = _syscalls(area, "-c", _RESUME, str(area))
        desc = "vm.resume.json"
    renames = [i for i, c in enumerate(calls) if re.search(r"rename", c) and desc + '"' in c]
    assert len(renames) == 1, calls
    (r,) = renames
    tmp = re.search(r'rename\w*\((?:\d+<[^>]*>, )?"([^"]+)"', calls[r])
    assert tmp is not None, calls[r]
    tmp_name = Path(tmp.group(1)).name
    # the temporary's data, before its rename; the folder, after it
    assert any("sync" in c and tmp_name + ">" in c for c in calls[:r]), calls
    assert any("fsync" in c and f"<{area.resolve()}>" in c for c in calls[r + 1 :]), calls
    assert sorted(p.name for p in area.iterdir()) == sorted([desc, "disk.img"])


@pytest.mark.parametrize("command", ["init", "remote add", "remote remove", "clone"])
def test_the_repository_config_is_durable(tmp_path: Path, command: str) -> None:
    """Each write of ``config``: ``config.lock`` fsynced, renamed, the folder fsynced after.

    dulwich renamed it into place without the folder's fsync: a power loss
    could bring back the file as it was (a remote added, a setting, gone).
    """
    need("strace")
    from tests.reliability.helpers import vml

    src = tmp_path / "src.git"
    assert vml(src, "init", src).code == 0
    repo = tmp_path / "repo.git"
    if command not in ("init", "clone"):
        assert vml(repo, "init", repo).code == 0
    if command == "remote remove":
        assert vml(repo, "remote", "add", "origin", src).code == 0
    args = {
        "init": ["init", str(repo)],
        "remote add": ["-R", str(repo), "remote", "add", "origin", str(src)],
        "remote remove": ["-R", str(repo), "remote", "remove", "origin"],
        "clone": ["clone", str(src), str(repo)],
    }[command]
    calls = _syscalls(repo, "-m", "vml", *args)  # the repository need not exist yet
    renames = [i for i, c in enumerate(calls) if "rename" in c and 'config"' in c]
    assert renames, calls
    last = renames[-1]
    assert any("sync" in c and "config.lock>" in c for c in calls[:last]), calls
    assert any("fsync" in c and f"<{repo.resolve()}>" in c for c in calls[last + 1 :]), calls
