"""A qcow2 image's data clusters, mapped in memory that follows the file, never the mapped count.

``qcow2.changed_ranges`` and ``qcow2.data_clusters`` read every L2 table of
an image.  A 100 GiB image with every cluster mapped (``preallocation=
metadata``, or a full disk) once took 650 MiB and 8 s as a set of ranges;
the map is now one byte per host cluster.  Its answers are checked
against ``qemu-img map`` (the host offset of every data cluster), and
metadata naming tables larger than the file is refused before anything is
allocated for it.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import need
from vml.plumbing.vm import qcow2

pytestmark = pytest.mark.compat

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
CLUSTER = 64 * KIB
T = TypeVar("T")


def _peak(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the most memory Python held for it at once."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _qemu_data(image: Path) -> list[tuple[int, int]]:
    """Host ranges of the image's data clusters, as ``qemu-img map`` gives them."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)], check=True, capture_output=True
    ).stdout
    return qcow2.merge_ranges(
        [(e["offset"], e["offset"] + e["length"]) for e in json.loads(out) if "offset" in e]
    )


def _without(size: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    rest, pos = [], 0
    for a, b in taken:
        if pos < a:
            rest.append((pos, a))
        pos = max(pos, b)
    return rest + ([(pos, size)] if pos < size else [])


def _ranges(image: Path, dirty: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], ...]:
    fd = os.open(image, os.O_RDONLY)
    try:
        return qcow2.changed_ranges(fd, dirty)
    finally:
        os.close(fd)


def test_a_fully_mapped_image_costs_memory_by_its_file(tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io"):
        need(tool)
    image = tmp_path / "d.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"]
    subprocess.run([*create, str(image), str(16 * GIB)], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 7 {3 * GIB} {CLUSTER}", str(image)], check=True)
    data = _qemu_data(image)
    assert sum(b - a for a, b in data) == 16 * GIB  # every cluster mapped
    dirty = [(3 * GIB, 3 * GIB + CLUSTER)]
    (written, rest), peak = _peak(lambda: _ranges(image, dirty))
    # 262,144 clusters: 256 KiB of map, one L2 table at a time; as a set of
    # ranges the same answer took ~40 MiB.
    assert peak < 2 * MIB, peak
    entries = json.loads(_map(image))
    host = next(e for e in entries if e["start"] <= 3 * GIB < e["start"] + e["length"])
    at = host["offset"] + 3 * GIB - host["start"]
    assert written == [(at, at + CLUSTER)]
    assert rest == _without(image.stat().st_size, data)
    fd = os.open(image, os.O_RDONLY)
    try:
        known, peak = _peak(lambda: qcow2.data_clusters(fd))
        assert peak < 2 * MIB, peak
        assert qcow2.changed_ranges(fd, dirty, known) == (written, rest)
    finally:
        os.close(fd)


def _map(image: Path) -> bytes:
    return subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)], check=True, capture_output=True
    ).stdout


def test_clusters_written_out_of_order_are_mapped_exactly(tmp_path: Path) -> None:
    # Host clusters allocated in a shuffled guest order: no L2 table is one run.
    for tool in ("qemu-img", "qemu-io"):
        need(tool)
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "2G"], check=True)
    rng = random.Random(12)
    clusters = rng.sample(range(2 * GIB // CLUSTER), 300)
    cmds = [c for n in clusters for c in ("-c", f"write -P {n % 250} {n * CLUSTER} {CLUSTER}")]
    subprocess.run(["qemu-io", *cmds, str(image)], check=True, capture_output=True)
    data = _qemu_data(image)
    offsets = [e["offset"] for e in json.loads(_map(image)) if "offset" in e]
    assert offsets != sorted(offsets)  # guest order is not host order
    written, rest = _ranges(image, [])
    assert written == [] and rest == _without(image.stat().st_size, data)
    dirty = sorted((n * CLUSTER, (n + 1) * CLUSTER) for n in clusters[:20])
    written, rest = _ranges(image, dirty)
    entries = json.loads(_map(image))
    hosts = []
    for guest, _ in dirty:
        e = next(e for e in entries if e["start"] <= guest < e["start"] + e["length"])
        hosts.append((e["offset"] + guest - e["start"], e["offset"] + guest - e["start"] + CLUSTER))
    assert written == qcow2.merge_ranges(hosts)
    assert rest == _without(image.stat().st_size, data)


def _header_field(image: Path, offset: int, fmt: str, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize(
    ("offset", "fmt", "value"),
    [
        (36, ">I", 0xFFFF_FFFF),  # L1 entries: 32 GiB of table
        (36, ">I", 1 << 20),  # within QEMU's limit, past the file's end
        (40, ">Q", 1 << 50),  # the L1 table far past the file's end
    ],
)
def test_metadata_larger_than_the_file_is_refused_before_reading(
    tmp_path: Path, offset: int, fmt: str, value: int
) -> None:
    need("qemu-img")
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64G"], check=True)
    _header_field(image, offset, fmt, value)
    fd = os.open(image, os.O_RDONLY)
    try:
        for call in (lambda: qcow2.data_clusters(fd), lambda: qcow2.changed_ranges(fd, [])):
            tracemalloc.start()
            try:
                with pytest.raises(qcow2.Unmappable):
                    call()
                assert tracemalloc.get_traced_memory()[1] < MIB
            finally:
                tracemalloc.stop()
    finally:
        os.close(fd)
