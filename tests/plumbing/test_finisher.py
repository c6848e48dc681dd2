"""Files are made durable and renamed into place in a thread while the next ones are built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vml.plumbing.entries import FileRecord
from vml.plumbing.restoring import _FINISHING, _Finisher


def _written(tmp_path: Path, i: int) -> tuple[int, Path, Path, FileRecord]:
    tmp = tmp_path / f"tmp{i}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"x" * i)
    rec = FileRecord(f"f{i}", "small", 0o100644, 10**18 + i, i, "", perm=0o640)
    return fd, tmp, tmp_path / f"f{i}", rec


def test_every_file_is_put_in_place_with_its_metadata_and_reported_in_order(
    tmp_path: Path,
) -> None:
    fin = _Finisher()
    seen: list[tuple[str, int]] = []
    n = 3 * _FINISHING  # more than may wait at once
    for i in range(n):
        fd, tmp, dest, rec = _written(tmp_path, i)
        fin.submit(fd, tmp, dest, rec, lambda st, p=rec.path: seen.append((p, st.st_size)))
    fin.drain()
    assert seen == [(f"f{i}", i) for i in range(n)]
    for i in range(n):
        st = (tmp_path / f"f{i}").stat()
        assert (st.st_size, st.st_mode & 0o777, st.st_mtime_ns) == (i, 0o640, 10**18 + i)
        assert not (tmp_path / f"tmp{i}").exists()


def test_a_file_that_cannot_be_finished_is_raised_after_the_others_are_done(
    tmp_path: Path,
) -> None:
    fin = _Finisher()
    for i in range(4):
        fd, tmp, dest, rec = _written(tmp_path, i)
        if i == 1:
            tmp.unlink()  # its rename fails
        fin.submit(fd, tmp, dest, rec, lambda st: None)
    with pytest.raises(FileNotFoundError):
        fin.drain()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["f0", "f2", "f3"]
