"""The pieces of benchmark W2 that decide its numbers, on KiB-sized files.

W2 itself (a real guest, minutes) is not run here; what it measures with is:
bytes read by a command's whole process tree, content digests that ignore
holes, holes counted apart, changed bytes between two states of a disk
(raw, and qcow2 through its guest view), the guest's init script, and the
command line keeping W1's defaults.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.measure import run_measured
from bench.run import parse_args
from bench.sparse import (
    area_digest,
    changed_bytes,
    evict,
    file_digest,
    guest_view,
    holes_lost,
)
from bench.w2guest import GuestData

pytestmark = pytest.mark.compat

KIB = 1024


def _sparse(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)
    return path


def test_bytes_read_count_the_whole_process_tree(tmp_path: Path) -> None:
    need("/usr/bin/time")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(300 * KIB))
    # The command reads nothing itself: a child reads once, a grandchild twice.
    cmd = f"cat {data} > /dev/null; sh -c 'cat {data} {data} > /dev/null'"
    m = run_measured(["sh", "-c", cmd], io=True)
    assert m.read_chars is not None and 900 * KIB <= m.read_chars < 1000 * KIB
    assert m.read_bytes is not None
    assert run_measured(["true"], io=True).read_chars < 64 * KIB  # type: ignore[operator]
    # A descendant that daemonizes (re-parented away from the tree) still counts.
    daemon = f"(sleep 0.3; cat {data} > /dev/null) & exit 0"
    m = run_measured(["sh", "-c", daemon], io=True)
    assert m.read_chars is not None and m.read_chars >= 300 * KIB
    # Without io the command runs unwrapped, as W1 always did.
    assert run_measured(["true"]).read_chars is None


def test_evicted_area_is_read_from_storage(tmp_path: Path) -> None:
    need("/usr/bin/time")
    data = tmp_path / "disk.raw"
    data.write_bytes(os.urandom(512 * KIB))
    evict(tmp_path)
    cold = run_measured(["cat", str(data)], io=True)
    warm = run_measured(["cat", str(data)], io=True)
    assert cold.read_bytes is not None and cold.read_bytes >= 512 * KIB
    assert warm.read_bytes is not None and warm.read_bytes < 512 * KIB
    assert cold.read_chars == warm.read_chars


def test_wrapper_does_not_count_its_own_reads_of_its_counters() -> None:
    # The counters' text changes length with their digits; a command's rchar
    # must not (cold and warm runs once differed by five bytes for it).
    from bench.iowrap import proc_io

    for _ in range(50):
        before, took = proc_io()
        after, _ = proc_io()
        assert after["rchar"] - before["rchar"] - took == 0


def test_digest_is_content_only_and_holes_are_counted_apart(tmp_path: Path) -> None:
    block = os.urandom(64 * KIB)
    holey = _sparse(tmp_path / "a", 8 << 20, {1 << 20: block})
    dense = tmp_path / "b"
    dense.write_bytes(bytes(1 << 20) + block + bytes((8 << 20) - (1 << 20) - len(block)))
    a, b = file_digest(holey), file_digest(dense)
    assert a.digest == b.digest and a.size == b.size
    assert a.data == 64 * KIB and b.data == 8 << 20
    assert holes_lost({"f": a}, {"f": b}) == {"f": b.allocated - a.allocated}
    assert holes_lost({"f": b}, {"f": a}) == {}
    # One byte more, or one byte moved, is another content.
    moved = _sparse(tmp_path / "c", 8 << 20, {(1 << 20) + 4096: block})
    longer = _sparse(tmp_path / "d", (8 << 20) + 1, {1 << 20: block})
    assert len({a.digest, file_digest(moved).digest, file_digest(longer).digest}) == 3


def test_area_digest_skips_vml_folder(tmp_path: Path) -> None:
    (tmp_path / ".vml" / "cache").mkdir(parents=True)
    (tmp_path / ".vml" / "cache" / "x").write_bytes(b"cache")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "disk.raw").write_bytes(b"disk")
    assert list(area_digest(tmp_path)) == ["sub/disk.raw"]


def test_changed_bytes_counts_differing_chunks_of_data_only(tmp_path: Path) -> None:
    size = 64 << 20
    one, two = os.urandom(4 * KIB), os.urandom(200 * KIB)
    old = _sparse(tmp_path / "old", size, {0: one, 10 << 20: two})
    new = _sparse(tmp_path / "new", size, {0: one, 10 << 20: two, 30 << 20: one})
    assert changed_bytes(old, new) == 64 * KIB
    assert changed_bytes(old, new, 4 * KIB) == 4 * KIB
    # Zeros written over a hole change nothing; data punched out changes its chunks.
    zeros = _sparse(tmp_path / "zeros", size, {0: one, 10 << 20: two, 40 << 20: bytes(1 << 20)})
    assert changed_bytes(old, zeros) == 0
    gone = _sparse(tmp_path / "gone", size, {0: one})
    assert changed_bytes(old, gone) == 4 * 64 * KIB  # 200 KiB at 10 MiB spans 4 chunks
    shorter = _sparse(tmp_path / "short", 1 << 20, {0: one})
    assert changed_bytes(old, shorter) == 4 * 64 * KIB
    assert changed_bytes(tmp_path / "missing", old) == 5 * 64 * KIB


def test_changed_bytes_of_qcow2_states_in_guest_offsets(tmp_path: Path) -> None:
    need("qemu-img")
    need("qemu-io")
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
    io = ["qemu-io", "-f", "qcow2", "-c", "write -q -P 7 512M 128K", str(disk)]
    subprocess.run(io, check=True)
    guest_view(disk, "qcow2", tmp_path / "s1.raw")
    # A rewrite in place and a new cluster: the qcow2 file grows at its end,
    # but in guest offsets exactly the two written ranges changed.
    for cmd in ("write -q -P 9 512M 4K", "write -q -P 3 900M 64K"):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(disk)], check=True)
    guest_view(disk, "qcow2", tmp_path / "s2.raw")
    assert changed_bytes(tmp_path / "s1.raw", tmp_path / "s2.raw") == 2 * 64 * KIB
    assert file_digest(tmp_path / "s2.raw").data <= 256 * KIB


def test_guest_init_is_valid_sh_with_every_size_filled_in(tmp_path: Path) -> None:
    data = GuestData.for_fill(512, 16)
    script = data.init_script()
    assert "@" not in script
    (tmp_path / "init").write_text(script)
    shell = shutil.which("busybox")
    cmd = [shell, "sh", "-n"] if shell else ["sh", "-n"]
    subprocess.run([*cmd, str(tmp_path / "init")], check=True)
    # What the host puts on the disk fits in what was asked.
    made = data.fill // 8 + 4 * data.package + 4 * data.meas + data.runs * data.run + data.big
    assert 0.9 * data.fill <= made <= data.fill
    assert data.big >= 16 << 20 and data.over < data.big and data.copy < data.run
    tiny = GuestData.for_fill(24, 1)
    assert tiny.runs >= 2 and tiny.over >= 64 * KIB


def test_command_line_keeps_w1_and_sizes_w2_smoke() -> None:
    w1 = parse_args([])
    assert (w1.workload, w1.disk_mib, w1.states, w1.tools) == (
        "w1",
        2048,
        6,
        "vml,borg,bup,restic,cp",
    )
    assert (w1.w2_disk_mib, w1.w2_fill_mib, w1.w2_ram_mib, w1.w2_formats) == (
        65536,
        512,
        256,
        "qcow2,raw",
    )
    smoke = parse_args(["--workload", "w2", "--smoke"])
    assert smoke.w2_disk_mib <= 256 and smoke.w2_sessions <= 2 and smoke.disk_mib == 64
    with pytest.raises(SystemExit):
        parse_args(["--w2-formats", "vmdk"])
