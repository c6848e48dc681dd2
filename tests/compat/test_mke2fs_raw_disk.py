"""A raw disk made by a real ``mke2fs``: its journal is fallocated space, never read, back as holes.

``mke2fs`` zeroes the journal with ``fallocate``, which ext4 and XFS keep
as unwritten extents; once anything has read them (a backup tool, ``cat``),
``SEEK_DATA`` reports them as data.  A save reads only the written data,
and the disk comes back byte for byte, its journal a hole, ``e2fsck`` clean.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import allocated, need, need_unwritten_extents
from vml.plumbing.repository import init_repository
from vml.plumbing.vm.formats import data_ranges
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit
from vml.porcelain.status import status

MiB = 1 << 20


def _data(path: Path, **kw: bool) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(b - a for a, b in data_ranges(fd, os.fstat(fd).st_size, **kw))
    finally:
        os.close(fd)


def test_a_mke2fs_disk_is_saved_without_its_journal(tmp_path: Path) -> None:
    need("mke2fs")
    need("e2fsck")
    need_unwritten_extents(tmp_path)
    files = tmp_path / "files"
    (files / "d").mkdir(parents=True)
    (files / "d" / "a.bin").write_bytes(os.urandom(300 << 10))
    (files / "b.txt").write_text("".join(f"{n}\n" for n in range(20000)))
    area = tmp_path / "area"
    area.mkdir()
    disk = area / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)  # a 4 MiB journal
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-F", "-d", str(files), str(disk)],
        check=True,
        capture_output=True,
    )
    with open(disk, "rb") as f:  # every page cached: the journal's zeros become data to SEEK_DATA
        while f.read(MiB):
            pass
    seen = _data(disk)
    repo = init_repository(tmp_path / "repo")
    e1 = commit(repo, area)
    written = _data(disk, skip_unwritten=True)
    assert e1.read_bytes == written
    assert written <= seen - 4 * MiB  # the journal was not read
    out = tmp_path / "out"
    checkout(repo, e1.entry, out)
    got = out / "disk.raw"
    subprocess.run(["cmp", str(got), str(disk)], check=True)
    assert _data(got) == written and allocated(got) <= written + (64 << 10)
    subprocess.run(["e2fsck", "-fn", str(got)], check=True, capture_output=True)
    assert status(repo, out).clean and status(repo, area).clean
