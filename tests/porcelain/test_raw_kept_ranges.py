"""A raw disk's dirty ranges, kept by ``vml stop`` when it ends QEMU: a save at rest reads only them.

QEMU cannot store a bitmap in a raw file; ``vml stop --save`` reads it
(the guest stopped) and keeps the ranges in ``.vml/``.  A real QEMU runs a
VM whose only disk is raw (SeaBIOS finds nothing to boot and waits); the
"guest" writes through QEMU's block layer (HMP ``qemu-io``).  Every entry
is checked byte for byte against the disk it saved: a save that trusted
too few ranges would restore the parent's bytes where the guest wrote.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_vm_run import ROOT
from tests.conftest import allocated, need
from tests.porcelain import test_dirty_bitmaps as qcow2_tests
from vml.plumbing.repository import Repository, init_repository
from vml.plumbing.vm import bitmaps
from vml.plumbing.vm.ignore import VML_DIR
from vml.plumbing.vm.qemu import RunPaths
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import CommitResult, commit
from vml.porcelain.run import run
from vml.porcelain.stop import stop
from vml.porcelain.vminit import vm_init

MiB = 1 << 20
RAW = "data.img"
guest_write = qcow2_tests.guest_write
at_pause = qcow2_tests.at_pause  # a fixture: the disks as each live save's pause saw them
DATA = 12 * MiB  # what the disk holds: a save that reads it whole reads at least this


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Repository, Path]]:
    """A repository and an area whose VM has one raw disk holding 12 MiB of data."""
    for tool in ("qemu-system-x86_64", "qemu-img"):
        need(tool)
    area = tmp_path / "lab"
    area.mkdir()
    with open(area / RAW, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(16 * MiB)
        f.write(os.urandom(DATA))
    vm_init(area, disks=[area / RAW], memory="16M", network="none")
    repo = init_repository(tmp_path / "repo", 64 << 10)
    yield repo, area
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(RunPaths(area).pidfile.read_text().split()[0]), signal.SIGKILL)


def _same_disk(repo: Repository, entry: CommitResult, where: Path, want: Path) -> None:
    out = where / f"check-{entry.entry}"
    checkout(repo, entry.entry, out)
    assert (out / RAW).read_bytes() == (want / RAW).read_bytes()


def _disk_read(area: Path, e: CommitResult) -> int:
    """Bytes the save read of the disk: all it read, less the other files' data (read whole)."""
    others = [p for p in os.listdir(area) if p != RAW and (area / p).is_file()]
    return e.read_bytes - sum(allocated(area / p) for p in others)


def _kept_files(area: Path) -> list[str]:
    return sorted(n for n in os.listdir(area / VML_DIR) if n.startswith(bitmaps.KEPT_PREFIX))


def _first_save_and_write(repo: Repository, area: Path) -> CommitResult:
    run(area, accel="tcg")
    e1 = commit(repo, area)
    guest_write(area, 0, 20 * MiB, 4096, 7)  # in the data
    guest_write(area, 0, 40 * MiB, 128 << 10, 8)  # in a hole
    return e1


def test_a_save_at_rest_reads_only_the_ranges_stop_kept(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area = lab
    _first_save_and_write(repo, area)
    res = stop(area, save=True)
    assert res.notes == []
    rec = bitmaps.load_records(area)[RAW]
    assert rec.kept is not None and _kept_files(area) == [rec.kept]
    assert bitmaps.read_kept(area, rec, rec.kept) == [
        (20 * MiB, 20 * MiB + (64 << 10)),
        (40 * MiB, 40 * MiB + (128 << 10)),
    ]
    e2 = commit(repo, area)
    assert e2.notes == []
    assert _disk_read(area, e2) <= 192 << 10  # the dirty ranges, not the 12 MiB it holds
    _same_disk(repo, e2, tmp_path, area)


def test_ranges_of_two_runs_are_added_up(lab: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, area = lab
    _first_save_and_write(repo, area)
    stop(area, save=True)
    first = bitmaps.load_records(area)[RAW]
    run(area)  # resumes; a new bitmap carries the kept ranges on
    rec = bitmaps.load_records(area)[RAW]
    assert rec.name != first.name and rec.carried == first.kept and rec.kept is None
    guest_write(area, 0, 50 * MiB, 4096, 9)
    stop(area, save=True)
    rec = bitmaps.load_records(area)[RAW]
    assert bitmaps.read_kept(area, rec, rec.kept) == [
        (20 * MiB, 20 * MiB + (64 << 10)),
        (40 * MiB, 40 * MiB + (128 << 10)),
        (50 * MiB, 50 * MiB + (64 << 10)),
    ]
    assert _kept_files(area) == [rec.kept]  # the first run's file went
    e2 = commit(repo, area)
    assert e2.notes == [] and _disk_read(area, e2) <= 256 << 10
    _same_disk(repo, e2, tmp_path, area)


def test_a_live_save_adds_the_ranges_an_earlier_run_kept(
    lab: tuple[Repository, Path], tmp_path: Path, at_pause: dict[str, object]
) -> None:
    repo, area = lab
    _first_save_and_write(repo, area)
    stop(area, save=True)
    run(area)
    guest_write(area, 0, 50 * MiB, 4096, 9)
    e2 = commit(repo, area)  # live
    assert e2.notes == []
    changed = at_pause["changed"]
    assert isinstance(changed, dict)
    assert changed[RAW] == [
        (20 * MiB, 20 * MiB + (64 << 10)),
        (40 * MiB, 40 * MiB + (128 << 10)),
        (50 * MiB, 50 * MiB + (64 << 10)),
    ]
    _same_disk(repo, e2, tmp_path, Path(str(at_pause["dir"])))
    rec = bitmaps.load_records(area)[RAW]
    assert rec.since == e2.commit and rec.carried is None and _kept_files(area) == []


def test_a_disk_written_after_stop_is_read_whole(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area = lab
    _first_save_and_write(repo, area)
    stop(area, save=True)
    fd = os.open(area / RAW, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xee", 30 * MiB + 5)  # no bitmap saw this
    finally:
        os.close(fd)
    e2 = commit(repo, area)
    assert e2.notes == [f"{RAW}: read whole: it changed since QEMU closed it"]
    assert _disk_read(area, e2) >= DATA
    _same_disk(repo, e2, tmp_path, area)


def test_a_damaged_kept_file_is_not_used(lab: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, area = lab
    _first_save_and_write(repo, area)
    stop(area, save=True)
    kept = area / VML_DIR / str(bitmaps.load_records(area)[RAW].kept)
    data = bytearray(kept.read_bytes())
    data[len(data) // 2] ^= 0x40
    kept.write_bytes(bytes(data))
    e2 = commit(repo, area)
    assert e2.notes == [f"{RAW}: read whole: its kept dirty ranges are damaged (checksum)"]
    assert _disk_read(area, e2) >= DATA
    _same_disk(repo, e2, tmp_path, area)


def test_a_missing_kept_file_is_not_used(lab: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, area = lab
    _first_save_and_write(repo, area)
    stop(area, save=True)
    (area / VML_DIR / str(bitmaps.load_records(area)[RAW].kept)).unlink()
    e2 = commit(repo, area)
    assert len(e2.notes) == 1
    assert e2.notes[0].startswith(f"{RAW}: read whole: its kept dirty ranges cannot be read")
    _same_disk(repo, e2, tmp_path, area)


KILLED = (
    f"{RAW}: read whole: QEMU keeps a raw disk's dirty bitmap only while it runs, "
    "and it ended without its dirty ranges kept (killed or crashed, or so was their keeper?)"
)


def test_a_killed_qemu_leaves_no_ranges(lab: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, area = lab
    _first_save_and_write(repo, area)
    stop(area, force_kill=True)
    e2 = commit(repo, area)
    assert e2.notes == [KILLED]
    assert _disk_read(area, e2) >= DATA
    _same_disk(repo, e2, tmp_path, area)


def test_a_killed_second_run_does_not_trust_the_first_runs_ranges(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area = lab
    _first_save_and_write(repo, area)
    stop(area, save=True)
    run(area)
    guest_write(area, 0, 50 * MiB, 4096, 9)  # the kept ranges do not hold this
    stop(area, force_kill=True)
    e2 = commit(repo, area)
    assert e2.notes == [KILLED]
    _same_disk(repo, e2, tmp_path, area)


def test_a_checkout_drops_the_kept_ranges(lab: tuple[Repository, Path]) -> None:
    repo, area = lab
    e1 = _first_save_and_write(repo, area)
    stop(area, save=True)
    assert _kept_files(area)
    commit(repo, area)
    checkout(repo, e1.entry, area, force=True)
    assert bitmaps.load_records(area) == {} and _kept_files(area) == []


def test_a_kept_file_of_another_record_is_not_used(lab: tuple[Repository, Path]) -> None:
    """Tied to the record: its bitmap, ``since``, the disk's inode and size."""
    repo, area = lab
    _first_save_and_write(repo, area)
    stop(area, save=True)
    rec = bitmaps.load_records(area)[RAW]
    assert rec.kept is not None
    for other in (
        bitmaps.Record(rec.name, "0" * 40, rec.inode, rec.size, False),
        bitmaps.Record(rec.name, rec.since, rec.inode + 1, rec.size, False),
        bitmaps.Record(rec.name, rec.since, rec.inode, rec.size + 4096, False),
    ):
        with pytest.raises(bitmaps.KeptUnusable, match="not those of"):
            bitmaps.read_kept(area, other, rec.kept)


SAVER = """
import sys, time
import vml.plumbing.vm.live as live
real = live.copy_ranges
def stuck(src, dst, ranges):
    n = real(src, dst, ranges)
    print("PAUSED", flush=True)
    time.sleep(600)
    return n
live.copy_ranges = stuck
from vml.cli.app import main
sys.argv = ["vml", *sys.argv[1:]]
main()
"""


def test_a_bitmap_a_killed_live_save_rotated_is_not_kept(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    """The record's bitmap stopped recording in that pause: the writes since are in another."""
    repo, area = lab
    _first_save_and_write(repo, area)
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, "--repo", str(tmp_path / "repo"), "commit", str(area), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"PAUSED\n", proc.communicate()
    finally:
        proc.kill()
        proc.wait()
    run(area, cont=True)
    guest_write(area, 0, 50 * MiB, 4096, 9)  # recorded by the rotated-in bitmap only
    res = stop(area, save=True)
    name = bitmaps.load_records(area)[RAW].name
    assert res.notes == [
        f"{RAW}: its dirty ranges were not kept: QEMU has no recording dirty bitmap {name}"
    ]
    e2 = commit(repo, area)
    assert e2.notes == [KILLED]
    _same_disk(repo, e2, tmp_path, area)
