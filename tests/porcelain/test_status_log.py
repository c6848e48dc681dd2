"""``vml status``, ``vml log`` and ``vml show``."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, edit, make_area
from vml.plumbing.packreader import COMMIT, PackReader
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


def _newest(res_ids: list[str], k: int) -> list[str]:
    return sorted(res_ids, key=lambda i: int(i[1:]), reverse=True)[:k]


def test_log_limit_is_the_head_of_the_full_log(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    """``log(limit=k)`` lists the k entries the full log lists first, as the forest they make.

    Over every k, for the whole forest and for one tree of it (two areas,
    a restore that branches one tree, a differential entry).
    """
    other = tmp_path / "other"
    make_area(other, seed=2)
    for i, (where, kind) in enumerate(
        [(area, None), (other, None), (area, None), (area, "differential"), (other, None)]
    ):
        edit(where / "vm.nvram", 0, b"%d" % i * 100)
        commit(repo, where, kind=kind)
    restore(repo, "E3", area)
    edit(area / "vm.nvram", 0, b"x" * 100)
    commit(repo, area)  # E6 <- E3
    full = log(repo)
    mine = full.entries["E6"].commit
    tree = log(repo, only_tree_of=mine)
    assert set(tree.entries) == {"E1", "E3", "E4", "E6"}
    for k in range(1, 8):
        for scope, whole in ((None, full), (mine, tree)):
            cut = log(repo, only_tree_of=scope, limit=k)
            want = _newest(list(whole.entries), k)
            assert sorted(cut.entries) == sorted(want), (k, scope)
            for i, le in cut.entries.items():
                assert le == whole.entries[i] or (
                    le.children == [c for c in whole.entries[i].children if c in cut.entries]
                )
                assert le.parent == whole.entries[i].parent
            # Roots: what is listed without its parent, oldest first.
            roots = [i for i in cut.entries if cut.entries[i].parent not in cut.entries]
            assert cut.roots == sorted(roots, key=lambda i: int(i[1:]))


def _counting(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Objects read through every PackReader, by type (commit 1, tree 2, blob 3)."""
    seen: Counter[int] = Counter()
    real = PackReader.read

    def read(
        self: PackReader, sha: bytes, expect_type: int | None = None, *, verify: bool = True
    ) -> tuple[int, bytes]:
        got = real(self, sha, expect_type, verify=verify)
        seen[got[0]] += 1
        return got

    monkeypatch.setattr(PackReader, "read", read)
    return seen


def test_log_limit_reads_what_it_shows(
    repo: Repository, area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``log -n 3`` reads 3 entries with 4 entries in the repository and with 12.

    Over the whole forest, nothing else is read; in one tree, only the
    commits of the chain below (to find the tree), never another entry's
    metadata.
    """
    seen = _counting(monkeypatch)
    reads: dict[int, tuple[Counter[int], Counter[int]]] = {}
    for total in (4, 12):
        while len(log(repo).entries) < total:
            edit(area / "vm.nvram", 0, os.urandom(64))
            commit(repo, area)
        seen.clear()
        everything = log(repo, limit=3)
        whole = Counter(seen)
        seen.clear()
        tree = log(repo, only_tree_of=everything.entries[f"E{total}"].commit, limit=3)
        reads[total] = (whole, Counter(seen))
        assert set(everything.entries) == set(tree.entries) == {f"E{total - k}" for k in range(3)}
    assert reads[4][0] == reads[12][0] == Counter({COMMIT: 3, 2: 3, 3: 3})
    for total in (4, 12):  # the chain's commits, and 3 entries' trees and metadata
        assert reads[total][1] == Counter({COMMIT: 3 + total, 2: 3, 3: 3})


def test_empty_log(repo: Repository) -> None:
    res = log(repo)
    assert res.entries == {} and res.roots == []


def test_status_counts_bytes_when_mode_and_content_change(repo: Repository, area: Path) -> None:
    commit(repo, area)
    edit(area / "disk.img", 0, b"\x05" * 4096)
    (area / "disk.img").chmod(0o755)
    [c] = status(repo, area).changes
    assert (c.path, c.changed_bytes) == ("disk.img", 4096)


def test_log_of_one_tree_reads_only_that_tree_s_metadata(
    repo: Repository, area: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vml log`` in an area reads the metadata of its tree's entries, not of other VMs'."""
    for i in range(5):
        edit(area / "vm.nvram", 0, b"%d" % i * 50)
        commit(repo, area)
    other = tmp_path / "other"
    make_area(other, seed=3)
    commit(repo, other)  # E6, a tree of its own
    seen = _counting(monkeypatch)
    res = log(repo, only_tree_of=log(repo).entries["E6"].commit)
    assert list(res.entries) == ["E6"] and res.roots == ["E6"]
    seen.clear()
    log(repo, only_tree_of=res.entries["E6"].commit)
    assert seen[2] == seen[3] == 1  # E6's tree and metadata; the others' commits only
