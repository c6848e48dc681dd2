"""``vml status``, ``vml log`` and ``vml show``."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import TEST_BLOCK, edit
from vml.plumbing.repository import Repository
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit
from vml.porcelain.log import log, show
from vml.porcelain.status import status


def test_status_reports_changes(repo: Repository, area: Path, tmp_path: Path) -> None:
    s = status(repo, area)
    assert s.entry is None and {c.change for c in s.changes} == {"added"}
    res = commit(repo, area)
    s = status(repo, area)
    assert s.clean and s.entry == "E1" and s.commit == res.commit and s.branch is None
    edit(area / "disk.img", TEST_BLOCK + 4096, b"\x01" * 4096)
    edit(area / "disk.img", 3 * TEST_BLOCK, b"\x02" * 100)  # within one page
    (area / "vm.nvram").unlink()
    (area / "added.txt").write_text("x")
    (area / "vm.vmx").write_text("changed\n")
    s = status(repo, area)
    assert not s.clean
    got = {c.path: (c.change, c.changed_bytes) for c in s.changes}
    assert got == {
        "disk.img": ("modified", 2 * 4096),
        "vm.nvram": ("removed", 8192),
        "added.txt": ("added", 1),
        "vm.vmx": ("modified", 8),
    }


def test_status_ignores_touch_and_sees_mode(repo: Repository, area: Path) -> None:
    commit(repo, area)
    os.utime(area / "disk.img", ns=(1, 1))
    assert status(repo, area).clean
    (area / "vm.vmx").chmod(0o755)
    [c] = status(repo, area).changes
    assert (c.path, c.change) == ("vm.vmx", "modified")


def test_status_of_a_grown_disk(repo: Repository, area: Path) -> None:
    commit(repo, area)
    disk = area / "disk.img"
    with open(disk, "ab") as f:
        f.write(b"\x03" * TEST_BLOCK)
    [c] = status(repo, area).changes
    assert c.path == "disk.img" and c.size == disk.stat().st_size
    assert c.changed_bytes == TEST_BLOCK


def test_log_forest_and_show(repo: Repository, area: Path, tmp_path: Path) -> None:
    commit(repo, area, message="fresh install")  # E1
    edit(area / "disk.img", 0, b"\x01" * 4096)
    commit(repo, area, tag="t2")  # E2
    edit(area / "disk.img", 4096, b"\x02" * 4096)
    commit(repo, area, kind="differential")  # E3 <- E1
    restore(repo, "E2", area)
    edit(area / "disk.img", 8192, b"\x03" * 4096)
    commit(repo, area, message="branch")  # E4 <- E2
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.img").write_bytes(b"\x09" * (TEST_BLOCK + 1))
    commit(repo, other)  # E5: another tree
    checkout(repo, "E3", tmp_path / "copy")

    res = log(repo)
    assert res.roots == ["E1", "E5"]
    e = res.entries
    assert e["E1"].children == ["E2", "E3"] and e["E2"].children == ["E4"]
    assert (e["E1"].kind, e["E1"].parent, e["E1"].message) == ("full", None, "fresh install")
    assert (e["E3"].kind, e["E3"].parent) == ("differential", "E1")
    assert e["E2"].labels == ["tag:t2"]
    assert e["E4"].areas == [str(area.resolve())]
    assert e["E3"].areas == [str((tmp_path / "copy").resolve())]
    assert e["E1"].stored_bytes > e["E2"].stored_bytes > 0
    assert (
        e["E1"].logical_bytes == sum(p.stat().st_size for p in area.iterdir() if p.is_file())
        or e["E1"].logical_bytes > 0
    )
    only = log(repo, only_tree_of=e["E5"].commit)
    assert set(only.entries) == {"E5"} and only.roots == ["E5"]
    only = log(repo, only_tree_of=e["E4"].commit)
    assert set(only.entries) == {"E1", "E2", "E3", "E4"}

    sh = show(repo, "E4")
    assert sh.chain == ["E4", "E2", "E1"]
    assert {f.path for f in sh.files} == {"disk.img", "vm.nvram", "vm.vmx"}
    assert sh.entry.message == "branch"
    assert show(repo, "t2").entry.id == "E2"
    j = sh.to_json()
    assert j["chain"] == ["E4", "E2", "E1"] and j["parent"] == "E2"


def test_empty_log(repo: Repository) -> None:
    res = log(repo)
    assert res.entries == {} and res.roots == []


def test_status_counts_bytes_when_mode_and_content_change(repo: Repository, area: Path) -> None:
    commit(repo, area)
    edit(area / "disk.img", 0, b"\x05" * 4096)
    (area / "disk.img").chmod(0o755)
    [c] = status(repo, area).changes
    assert (c.path, c.changed_bytes) == ("disk.img", 4096)
