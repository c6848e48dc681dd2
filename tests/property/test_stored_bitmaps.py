"""A qcow2's stored dirty bitmaps, read by VML, say what QEMU's own tools say.

VML reads a VM at rest's persistent bitmaps from the image file itself
(``qcow2.stored_bitmaps``, ``stored_dirty_ranges``) instead of starting
``qemu-img info``, ``qemu-nbd -B`` and ``qemu-img map``.  Real images,
real ``qemu-io`` writes recorded by real bitmaps, of any cluster size,
granularity and disk size; each bitmap's dirty ranges must equal what
``qemu-nbd`` exports, and its flags what ``qemu-img info`` lists, also
for a bitmap table entry that says "all ones" and a bitmap left in use.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need
from vml.plumbing.vm import bitmaps, qcow2

MiB = 1 << 20


def _qemu_dirty(image: Path, name: str, work: Path) -> list[tuple[int, int]]:
    """The bitmap's dirty ranges as QEMU exports them: ``qemu-nbd -r -B``, ``qemu-img map``."""
    sock = work / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", str(sock), "-x", "d", str(image)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        opts = (
            f"driver=nbd,server.type=unix,server.path={sock},export=d,"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"
        )
        done = subprocess.run(
            ["qemu-img", "map", "--output=json", "--image-opts", opts],
            capture_output=True,
            text=True,
            check=True,
        )
        return bitmaps.parse_map(done.stdout)
    finally:
        proc.terminate()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _qemu_flags(image: Path) -> dict[str, tuple[bool, bool, int]]:
    """Name -> (auto, in use, granularity), from ``qemu-img info``."""
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(done.stdout).get("format-specific", {}).get("data", {})
    return {
        m["name"]: ("auto" in m["flags"], "in-use" in m["flags"], m["granularity"])
        for m in data.get("bitmaps", [])
    }


def _mine(image: Path) -> dict[str, tuple[bool, bool, int]]:
    return {
        b.name: (b.recording, b.inconsistent, b.granularity) for b in bitmaps.image_bitmaps(image)
    }


def _stored(image: Path, name: str) -> qcow2.StoredBitmap:
    fd = os.open(image, os.O_RDONLY)
    try:
        return next(b for b in qcow2.stored_bitmaps(fd) if b.name == name)
    finally:
        os.close(fd)


writes = st.lists(
    st.tuples(st.integers(min_value=0, max_value=(96 * MiB) // 512 - 1), st.integers(1, 6 * MiB)),
    min_size=0,
    max_size=6,
)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=1, max_value=96 * MiB // 512).map(lambda s: s * 512),
    cluster=st.sampled_from([512, 4096, 65536]),
    granularity=st.sampled_from([512, 65536, MiB]),
    before=writes,
    after=writes,
    disabled=st.booleans(),
)
def test_stored_bitmaps_read_as_qemu_reads_them(
    tmp_path: Path,
    size: int,
    cluster: int,
    granularity: int,
    before: list[tuple[int, int]],
    after: list[tuple[int, int]],
    disabled: bool,
) -> None:
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        need(tool)
    work = tmp_path / "w"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    image = work / "d.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
    subprocess.run([*create, str(image), str(size)], check=True)

    def io(ops: list[tuple[int, int]], pattern: int) -> None:
        cmds = []
        for sector, length in ops:
            off = sector * 512 % size
            length = min(length, size - off) // 512 * 512 or 512
            cmds += ["-c", f"write -P {pattern} {off} {min(length, size - off)}"]
        if cmds:
            subprocess.run(
                ["qemu-io", "-f", "qcow2", *cmds, str(image)], check=True, capture_output=True
            )

    io(before, 1)
    add = ["qemu-img", "bitmap", "--add", "-g", str(granularity), str(image)]
    subprocess.run([*add, "mark"], check=True)
    subprocess.run([*add, "held"], check=True)
    if disabled:
        subprocess.run(["qemu-img", "bitmap", "--disable", str(image), "held"], check=True)
    io(after, 2)
    assert _mine(image) == _qemu_flags(image)
    for name in ("mark", "held"):
        assert bitmaps.dirty_at_rest(image, name) == _qemu_dirty(image, name, work), name
    # A table entry of 1 (no cluster): every bit of its cluster is set.
    stored = _stored(image, "mark")
    with open(image, "r+b") as f:
        f.seek(stored.table_offset)
        f.write(struct.pack(">Q", 1))
    assert bitmaps.dirty_at_rest(image, "mark") == _qemu_dirty(image, "mark", work)


def test_a_bitmap_left_in_use_is_inconsistent(tmp_path: Path) -> None:
    """The in-use flag, as a QEMU that died leaves it, reads as QEMU's tools read it."""
    for tool in ("qemu-img", "qemu-io"):
        need(tool)
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "mark"], check=True)
    assert _mine(image) == {"mark": (True, False, 65536)} == _qemu_flags(image)
    fd = os.open(image, os.O_RDWR)
    try:
        head = os.pread(fd, 104, 0)
        hlen = struct.unpack_from(">I", head, 100)[0]
        h = qcow2.Header(3, 16, 0, 0, 0, 0, 0, 0, 0, 0, hlen)
        ext = next(d for kind, d in qcow2._extensions(fd, h) if kind == 0x23852875)
        directory = struct.unpack_from(">Q", ext, 16)[0]
        flags = struct.unpack(">I", os.pread(fd, 4, directory + 12))[0]
        os.pwrite(fd, struct.pack(">I", flags | 1), directory + 12)  # in use
    finally:
        os.close(fd)
    assert _mine(image) == {"mark": (True, True, 65536)} == _qemu_flags(image)


def test_a_damaged_bitmap_directory_cannot_be_read(tmp_path: Path) -> None:
    need("qemu-img")
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "mark"], check=True)
    stored = _stored(image, "mark")
    with open(image, "r+b") as f:
        f.seek(stored.table_offset)
        f.write(struct.pack(">Q", (1 << 62) | 512))  # reserved bits set
    with pytest.raises(qcow2.Unmappable):
        bitmaps.dirty_at_rest(image, "mark")
    with pytest.raises(qcow2.Unmappable):
        bitmaps.dirty_at_rest(image, "no-such-bitmap")
