"""Dirty bitmaps: a save reads what QEMU says changed, and never less than the truth.

A real QEMU runs a VM with a qcow2 and a raw disk (SeaBIOS finds nothing
to boot and waits); the "guest" writes through QEMU's own block layer
(HMP ``qemu-io``), so its dirty bitmaps see every write.  Each live save
is checked against a full copy of the disks made in the same pause, and
each save at rest against the files: an entry must hold exactly the
disks' bytes whatever the bitmaps said.  Bitmaps that are missing, in use,
older than the area's entry, or that a write behind QEMU's back makes
untrue are not used, and the save says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, need
from vml.errors import UsageError
from vml.plumbing.repository import Repository, init_repository
from vml.plumbing.vm import bitmaps, live
from vml.plumbing.vm.qemu import RunPaths
from vml.plumbing.vm.qmp import QMPClient
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import CommitResult, commit
from vml.porcelain.run import run
from vml.porcelain.stop import stop
from vml.porcelain.vminit import vm_init

MiB = 1 << 20
QCOW2, RAW = "root.qcow2", "data.img"


def _qemu_io(image: Path, *cmds: str) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", *args, str(image)], check=True, capture_output=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Repository, Path]]:
    """A repository and an area whose VM has a qcow2 and a raw disk holding some data."""
    for tool in ("qemu-system-x86_64", "qemu-img", "qemu-io", "qemu-nbd"):
        need(tool)
    area = tmp_path / "lab"
    area.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(area / QCOW2), "64M"], check=True
    )
    _qemu_io(area / QCOW2, "write -P 1 0 1M", "write -P 2 40M 512k")
    with open(area / RAW, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(2 * MiB)
        f.write(os.urandom(2 * MiB))
    vm_init(area, disks=[area / QCOW2, area / RAW], memory="16M", network="none")
    repo = init_repository(tmp_path / "repo", TEST_BLOCK)
    yield repo, area
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(RunPaths(area).pidfile.read_text().split()[0]), signal.SIGKILL)


def guest_write(area: Path, disk: int, offset: int, length: int, pattern: int) -> None:
    """Write through QEMU, as a guest would: its bitmaps see it."""
    with QMPClient.connect(RunPaths(area).qmp) as c:
        out = c.execute(
            "human-monitor-command",
            {"command-line": f'qemu-io vml-disk{disk} "write -P {pattern} {offset} {length}"'},
        )
    assert "error" not in str(out).lower(), out


@pytest.fixture
def at_pause(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, object]:
    """Full copies of the disks made inside each pause, and the ranges the pause copied."""
    seen: dict[str, object] = {"dir": tmp_path / "at-pause"}
    real = live._copy_files

    def copying(p: live._Pause, dirty: dict[str, list[tuple[int, int]]]) -> None:
        ref = Path(str(seen["dir"]))
        shutil.rmtree(ref, ignore_errors=True)
        ref.mkdir()
        for d in p.spec.disks:
            shutil.copyfile(p.area / d.path, ref / d.path)
        real(p, dirty)
        seen["changed"] = dict(p.changed)

    monkeypatch.setattr(live, "_copy_files", copying)
    return seen


def _copied(seen: dict[str, object], rel: str) -> int | None:
    changed = seen["changed"]
    assert isinstance(changed, dict)
    ranges = changed.get(rel)
    return None if ranges is None else sum(b - a for a, b in ranges)


def _same_disks(repo: Repository, entry: CommitResult, where: Path, want: Path) -> None:
    out = where / f"check-{entry.entry}"
    checkout(repo, entry.entry, out)
    for rel in (QCOW2, RAW):
        assert (out / rel).read_bytes() == (want / rel).read_bytes(), rel


def test_live_saves_copy_only_what_the_bitmaps_mark(
    lab: tuple[Repository, Path], at_pause: dict[str, object], tmp_path: Path
) -> None:
    repo, area = lab
    run(area, accel="tcg")
    e1 = commit(repo, area, message="first")
    assert _copied(at_pause, QCOW2) is None and _copied(at_pause, RAW) is None  # whole
    records = bitmaps.load_records(area)
    assert {r.since for r in records.values()} == {e1.commit}
    assert records[QCOW2].persistent and not records[RAW].persistent
    guest_write(area, 0, 20 * MiB, 128 << 10, 7)
    guest_write(area, 1, 5 * MiB, 64 << 10, 8)
    e2 = commit(repo, area, message="second")
    assert e2.notes == []
    assert _copied(at_pause, RAW) == 64 << 10  # the one dirty block
    # The qcow2: all but the clean data (1.5 MiB the guest did not touch):
    # the dirty clusters, the metadata, the bitmaps QEMU stored.
    qcow2_copied = _copied(at_pause, QCOW2)
    size = (Path(str(at_pause["dir"])) / QCOW2).stat().st_size
    assert qcow2_copied is not None and qcow2_copied <= size - 3 * MiB // 2
    _same_disks(repo, e2, tmp_path, Path(str(at_pause["dir"])))
    # The next save counts from e2: the new bitmaps, the old ones gone.
    records = bitmaps.load_records(area)
    assert {r.since for r in records.values()} == {e2.commit}
    with QMPClient.connect(RunPaths(area).qmp) as c:
        present, _ = bitmaps.live_bitmaps(c)
    assert [b.name for b in present["vml-disk0"]] == [records[QCOW2].name]
    assert [b.name for b in present["vml-disk1"]] == [records[RAW].name]


def test_a_failed_save_leaves_the_bitmap_counting_from_the_entry(
    lab: tuple[Repository, Path], at_pause: dict[str, object], tmp_path: Path
) -> None:
    repo, area = lab
    run(area, accel="tcg")
    commit(repo, area, tag="first")
    guest_write(area, 1, 7 * MiB, 4096, 3)
    with pytest.raises(UsageError, match="exists already"):
        commit(repo, area, tag="first")  # refused after the pause: the bitmaps were rotated
    guest_write(area, 1, 9 * MiB, 4096, 4)
    e2 = commit(repo, area)
    assert e2.notes == []
    assert _copied(at_pause, RAW) == 2 * TEST_BLOCK  # both writes, the first one not lost
    _same_disks(repo, e2, tmp_path, Path(str(at_pause["dir"])))


def test_a_bitmap_qemu_lost_is_not_used(
    lab: tuple[Repository, Path], at_pause: dict[str, object], tmp_path: Path
) -> None:
    repo, area = lab
    run(area, accel="tcg")
    commit(repo, area)
    guest_write(area, 1, 3 * MiB, 4096, 5)
    name = bitmaps.load_records(area)[RAW].name
    with QMPClient.connect(RunPaths(area).qmp) as c:  # behind VML's back
        c.execute("block-dirty-bitmap-remove", {"node": "vml-disk1", "name": name})
    e2 = commit(repo, area)
    assert e2.notes == [
        f"{RAW}: read whole: its dirty bitmap {name} cannot be used (QEMU has no such bitmap "
        "(was it restarted?))"
    ]
    assert _copied(at_pause, RAW) is None  # copied whole
    _same_disks(repo, e2, tmp_path, Path(str(at_pause["dir"])))
    guest_write(area, 1, 4 * MiB, 4096, 6)
    e3 = commit(repo, area)  # the bitmap started in e2's pause counts again
    assert e3.notes == [] and _copied(at_pause, RAW) == TEST_BLOCK


def test_at_rest_a_qcow2_bitmap_and_a_raw_disks_kept_ranges_are_read(
    lab: tuple[Repository, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, area = lab
    run(area, accel="tcg")
    e1 = commit(repo, area)
    guest_write(area, 0, 30 * MiB, 64 << 10, 9)
    guest_write(area, 1, 6 * MiB, 4096, 10)
    stop(area, save=True)
    marked: list[int] = []
    real = bitmaps.dirty_at_rest

    def spy(path: Path, name: str) -> list[tuple[int, int]]:
        got = real(path, name)
        marked.append(sum(b - a for a, b in got))
        return got

    monkeypatch.setattr(bitmaps, "dirty_at_rest", spy)
    e2 = commit(repo, area)
    assert marked == [64 << 10]  # qemu-nbd -B said: that one cluster
    assert e2.notes == []  # the raw disk too: `vml stop --save` kept its dirty ranges
    _same_disks(repo, e2, tmp_path, area)
    # vml run starts counting from e2 (the disks are as e2 holds them).
    run(area)
    assert {r.since for r in bitmaps.load_records(area).values()} == {e2.commit}
    assert e1.commit != e2.commit


def test_a_write_behind_qemus_back_is_never_hidden(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    """The qcow2's bitmap is intact, but the file was written by something else: read it whole."""
    repo, area = lab
    run(area, accel="tcg")
    commit(repo, area)
    guest_write(area, 0, 30 * MiB, 64 << 10, 9)
    stop(area, save=True)
    mapped = subprocess.run(
        ["qemu-img", "map", "--output=json", str(area / QCOW2)], capture_output=True, text=True
    )
    host = next(e["offset"] for e in json.loads(mapped.stdout) if e["start"] == 40 * MiB)
    with open(area / QCOW2, "r+b") as f:  # the guest's data at 40 MiB, rewritten directly
        f.seek(host)
        f.write(b"\xee" * 4096)
    e2 = commit(repo, area)
    assert f"{QCOW2}: read whole: it changed since QEMU closed it" in e2.notes
    _same_disks(repo, e2, tmp_path, area)


def test_a_bitmap_left_in_use_or_older_than_the_entry_is_not_used(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area = lab
    run(area, accel="tcg")
    commit(repo, area)
    guest_write(area, 0, 30 * MiB, 64 << 10, 9)
    stop(area, force_kill=True)  # QEMU dies: the qcow2's bitmap stays flagged in use
    e2 = commit(repo, area)
    name = bitmaps.load_records(area)[QCOW2].name
    assert (
        f"{QCOW2}: read whole: its dirty bitmap {name} is flagged in use (QEMU did not close the image)"
        in e2.notes
    )
    _same_disks(repo, e2, tmp_path, area)
    _qemu_io(area / QCOW2, "write -P 11 50M 4k")
    e3 = commit(repo, area)
    assert (
        f"{QCOW2}: read whole: its dirty bitmap {name} started before the entry the area holds"
        in e3.notes
    )
    _same_disks(repo, e3, tmp_path, area)
