"""Issue #2's "done means", end to end through the CLI on a realistic area.

A VMware area (monolithicSparse VMDK written by qemu-img/qemu-io holding an
ext4 file system of real files, .vmx, .nvram, .vmem; the benchmark's
workload maker at a few MiB) gets a history of full, incremental and
differential entries with a branch made by `vml restore`; every entry then
checks out byte-identical into new areas and in place, `git fsck --full
--strict` is clean, and `vml log --json` and `git log --all` draw the same
forest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import need
from vml.cli.root import app

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.workload import WorkloadSpec, hash_area, make_area, run_session

SPEC = WorkloadSpec(disk_mib=48, fill_mib=8, vmem_mib=4, change_mib=1, seed=3)

pytestmark = pytest.mark.compat


def vml(repo: Path, *args: str) -> str:
    res = CliRunner().invoke(app, ["--repo", str(repo), *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_history_with_branch_checks_out_identical_everywhere(tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io", "mke2fs", "git"):
        need(tool)
    repo = tmp_path / "repo"
    area = tmp_path / "physics-vm"
    vml(repo, "init", str(repo), "--block-size", "256K")
    make_area(area, SPEC)

    saved: dict[str, dict[str, str]] = {}

    def save(*flags: str) -> str:
        entry = json.loads(vml(repo, "commit", str(area), "--json", *flags))["entry"]
        saved[entry] = hash_area(area)
        return entry

    assert save("-m", "installed") == "E1"  # full
    run_session(area, 1, SPEC)
    assert save("-m", "day 1") == "E2"  # incremental
    run_session(area, 2, SPEC)
    assert save("--differential", "-m", "day 2") == "E3"  # against E1
    run_session(area, 3, SPEC)
    assert save("-m", "day 3") == "E4"  # incremental on E3
    run_session(area, 4, SPEC)
    assert save("--full", "-m", "fresh full") == "E5"
    # Go back to E2 and work on from there: the tree branches at E2.
    vml(repo, "restore", "E2", str(area), "-q")
    assert hash_area(area) == saved["E2"]
    run_session(area, 5, SPEC)
    assert save("-m", "other idea") == "E6"
    run_session(area, 6, SPEC)
    assert save("-m", "other idea, more") == "E7"

    entries = json.loads(vml(repo, "log", "--json", "--all"))
    parents = {e["id"]: e["parent"] for e in entries}
    kinds = {e["id"]: e["kind"] for e in entries}
    assert parents == {
        "E1": None, "E2": "E1", "E3": "E1", "E4": "E3", "E5": None, "E6": "E2", "E7": "E6",
    }  # fmt: skip
    assert kinds["E3"] == "differential" and kinds["E5"] == "full" and kinds["E6"] == "incremental"

    # Every entry into a new area.
    for entry, hashes in saved.items():
        dest = tmp_path / f"new-{entry}"
        vml(repo, "checkout", entry, str(dest), "-q")
        assert hash_area(dest) == hashes, entry
        check = subprocess.run(
            ["qemu-img", "check", "-f", "vmdk", str(dest / "physics-vm.vmdk")],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr

    # Every entry in place, in one area, in an order that jumps across the forest.
    moving = tmp_path / "moving"
    for entry in ["E7", "E1", "E4", "E6", "E3", "E5", "E2", "E7"]:
        vml(repo, "checkout", entry, str(moving), "-q")
        assert hash_area(moving) == saved[entry], entry

    fsck = subprocess.run(
        ["git", "--git-dir", str(repo), "fsck", "--full", "--strict"],
        capture_output=True,
        text=True,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "error" not in fsck.stderr.lower()

    # git draws the same forest: every entry commit with the same parent links.
    by_commit = {e["commit"]: e["id"] for e in entries}
    git_log = subprocess.run(
        ["git", "--git-dir", str(repo), "log", "--all", "--format=%H %P"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    git_parents = {}
    for line in filter(None, git_log):
        commit, *ps = line.split()
        git_parents[by_commit[commit]] = by_commit[ps[0]] if ps else None
    assert git_parents == parents
    shutil.rmtree(tmp_path / "new-E1")
