"""A block written back leaves its zero pages as holes, and reads back as it was.

``write_sparse`` writes a built block's data pages and leaves (new file) or
punches (in place, over old bytes) its zero pages: whatever the mix of zero
and data pages, a short tail, or what the file held before, the bytes read
back are the block's and the file takes no more space than its data pages.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import allocated
from vml.plumbing.building import HOLE_GRAIN, write_sparse, zero_pages

G = HOLE_GRAIN

pages = st.lists(st.sampled_from(["zero", "data", "edge"]), min_size=1, max_size=40)


def _block(kinds: list[str], tail: int) -> bytes:
    out = bytearray()
    for k, kind in enumerate(kinds):
        page = bytearray(G)
        if kind == "data":
            page[:] = bytes([k % 251 + 1]) * G
        elif kind == "edge":  # zero but for one byte at either end: data
            page[0 if k % 2 else G - 1] = 7
        out += page
    return bytes(out + bytes(tail))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=pages, tail=st.sampled_from([0, 1, 100, G - 1]), fresh=st.booleans(), at=st.integers(0, 3)
)
def test_write_sparse_round_trips_and_keeps_holes(
    tmp_path: Path, kinds: list[str], tail: int, fresh: bool, at: int
) -> None:
    data = _block(kinds, tail)
    assert zero_pages(data) == {k for k, kind in enumerate(kinds) if kind == "zero"}
    path = tmp_path / "f"
    offset = at * 64 * G
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, offset + len(data) + G)
        if not fresh:  # the file held other bytes there
            os.pwrite(fd, b"\xee" * len(data), offset)
        written = write_sparse(fd, data, offset, fresh=fresh)
        assert os.pread(fd, len(data), offset) == data
        assert os.pread(fd, offset, 0) == bytes(offset)
    finally:
        os.close(fd)
    data_pages = sum(1 for kind in kinds if kind != "zero") + (1 if tail else 0)
    assert written == len(data) - G * len(zero_pages(data))
    assert allocated(path) <= data_pages * G + 2 * G  # (an extent block of the file system)
