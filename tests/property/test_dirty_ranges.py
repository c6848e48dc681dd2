"""What a dirty bitmap says, mapped to the image file, covers every byte that changed.

Real qcow2 and raw images, real ``qemu-io`` writes (through QEMU's block
layer, so an enabled persistent bitmap records them), real bitmap churn
(bitmaps added and removed, which makes QEMU rewrite and free metadata),
and the bitmap read back through ``qemu-nbd -B``.  Whatever the writes,
every byte of the file that differs from its copy taken when the bitmap
started must lie in the ranges ``file_ranges`` answers (or past the old
end of the file): a bitmap may over-report, never hide a change.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import need
from vml.plumbing.vm import bitmaps
from vml.plumbing.vm.qcow2 import merge_ranges

MiB = 1 << 20
SIZE = 64 * MiB

writes = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=SIZE // 512 - 1).map(lambda s: s * 512),
        st.sampled_from([512, 4096, 65536, 200_000]),
        st.sampled_from(["write -P {p}", "write -z", "write -c"]),
    ),
    min_size=1,
    max_size=8,
)


def _io(image: Path, fmt: str, cmds: list[str]) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", fmt, *args, str(image)], check=True, capture_output=True)


def _commands(ops: list[tuple[int, int, str]], fmt: str, touched: set[int]) -> list[str]:
    """qemu-io commands for ``ops``; ``touched`` holds the clusters written so far."""
    out = []
    for i, (off, length, kind) in enumerate(ops):
        length = min(length, SIZE - off)
        clusters = set(range(off // 65536, (off + length - 1) // 65536 + 1))
        whole = fmt == "qcow2" and off % 65536 == 0 and length == 65536
        if kind == "write -c" and (not whole or clusters & touched):
            # QEMU compresses only whole clusters of a qcow2 never written before
            # (a compressed write to an allocated cluster fails with EIO).
            kind = "write -P {p}"
        touched |= clusters
        out.append(f"{kind.format(p=i + 1)} {off} {length}")
    return out


def _differences(old: Path, new: Path) -> list[tuple[int, int]]:
    """``[first, last]`` of each run of bytes that differ between two files.

    Runs, not a chunk's first and last differing byte: two writes a few
    bytes apart in one chunk leave unchanged bytes between them, which no
    range need cover.  Read a MiB at a time: Hypothesis keeps a failing
    example's frames while it shrinks, so no example may hold the images.
    """
    out: list[tuple[int, int]] = []
    step = 1 << 20
    with open(old, "rb") as fa, open(new, "rb") as fb:
        i = 0
        while True:
            x, y = fa.read(step), fb.read(step)
            if not x or not y:
                return out
            for c in range(0, min(len(x), len(y)), 4096) if x != y else ():
                if x[c : c + 4096] == y[c : c + 4096]:
                    continue
                for k in range(c, min(c + 4096, len(x), len(y))):
                    if x[k] != y[k]:
                        if out and out[-1][1] == i + k - 1:
                            out[-1] = (out[-1][0], i + k)
                        else:
                            out.append((i + k, i + k))
            i += len(x)


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Every byte of [start, end) lies in one of ``ranges`` (sorted, merged)."""
    for a, b in ranges:
        if a <= start < b:
            if end <= b:
                return True
            start = b
    return False


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(before=writes, after=writes, churn=st.booleans())
# A compressed write over a cluster written before (QEMU refuses it: not a change).
@example(before=[(0, 512, "write -P {p}")], after=[(0, 65536, "write -c")], churn=False)
# Two writes 1 KiB apart in one 4 KiB chunk: the bytes between them did not change.
@example(
    before=[(0, 512, "write -P {p}")],
    after=[(223744, 235328, "write -P {p}"), (460288, 512, "write -P {p}")],
    churn=False,
)
def test_dirty_ranges_cover_every_change(
    tmp_path: Path,
    fmt: str,
    before: list[tuple[int, int, str]],
    after: list[tuple[int, int, str]],
    churn: bool,
) -> None:
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        need(tool)
    work = tmp_path / "w"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    image = work / f"d.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), str(SIZE)], check=True)
    touched: set[int] = set()
    _io(image, fmt, _commands(before, fmt, touched))
    if fmt == "raw":
        # No bitmap lives in a raw file: the guest ranges are the file's.
        old = work / "old"
        shutil.copyfile(image, old)
        ops = _commands(after, fmt, touched)
        _io(image, fmt, ops)
        dirty = [(int(c.split()[-2]), int(c.split()[-2]) + int(c.split()[-1])) for c in ops]
        written, rest = bitmaps.file_ranges(image, fmt, sorted(dirty))
    else:
        subprocess.run(
            ["qemu-img", "bitmap", "--add", "-g", "65536", str(image), "mark"], check=True
        )
        if churn:  # another bitmap that lives and dies: QEMU stores, moves and frees metadata
            subprocess.run(["qemu-img", "bitmap", "--add", str(image), "other"], check=True)
        old = work / "old"
        shutil.copyfile(image, old)
        _io(image, fmt, _commands(after, fmt, touched))
        if churn:
            subprocess.run(["qemu-img", "bitmap", "--remove", str(image), "other"], check=True)
        dirty = bitmaps.dirty_at_rest(image, "mark")
        written, rest = bitmaps.file_ranges(image, fmt, dirty)
        # The data clusters as runs (at rest) or as a set read before (a live save's pause).
        known = bitmaps.data_clusters(image)
        assert bitmaps.file_ranges(image, fmt, dirty, known) == (written, rest)
    ranges = merge_ranges(written + rest)
    for first, last in _differences(old, image):
        assert _covered(ranges, first, last + 1), (first, last, ranges)
