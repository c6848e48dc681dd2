"""Bytes a save reads from a raw disk made by ``mke2fs``: its data, not its journal.

    python bench/unwritten.py                           # 64 GiB disk, 512 MiB of files
    python bench/unwritten.py --disk-gib 8 --vml-src /tmp/vml-old --vml-src .

``mke2fs`` zeroes the journal with ``fallocate`` (unwritten extents, 512 MiB
on a 64 GiB ext4); ext4 reports them as data to ``SEEK_DATA`` once their
pages are cached.  For each ``--vml-src`` (a folder holding a ``vml``
package: an exported commit, default this one), W2's files
(``bench/w2guest.py``) go on a sparse raw disk made by ``mke2fs -d`` in a
fresh area; every page of it is read into the cache (as W2 does before a
save), and ``vml commit`` saves it; then 4 MiB of the data are overwritten,
cached again, and saved again (no dirty bitmap: a raw disk at rest).
Reported per save: ``read_bytes`` (the entry's count of what it read from
the area), ``rchar`` of the ``vml`` process (all it read: the repository,
Python's modules), and the disk's data by ``SEEK_DATA`` and without
unwritten extents.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.w2guest import GuestData, make_disk, make_tree
from vml.plumbing.vm.formats import data_ranges

MIB = 1 << 20
# Runs ``vml`` and writes its /proc/self/io on stderr as it exits.
_WRAP = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: sys.stderr.write(open('/proc/self/io').read()))\n"
    "sys.argv = ['vml'] + sys.argv[1:]\n"
    "runpy.run_module('vml', run_name='__main__')\n"
)


def _vml(src: Path, repo: Path, *args: str) -> tuple[float, int, dict[str, object]]:
    """Run ``vml --repo REPO ARGS --json`` from ``src``: seconds, rchar, its document."""
    env = dict(os.environ, PYTHONPATH=str(src))
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _WRAP, "--repo", str(repo), *args, "--json"],
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - t0
    io = dict(line.split(": ", 1) for line in done.stderr.splitlines() if ": " in line)
    return seconds, int(io["rchar"]), json.loads(done.stdout)


def _cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


def _data(path: Path) -> tuple[int, int]:
    """The disk's bytes of data: by ``SEEK_DATA``, and without its unwritten extents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        seek = sum(b - a for a, b in data_ranges(fd, size))
        written = sum(b - a for a, b in data_ranges(fd, size, skip_unwritten=True))
        return seek, written
    finally:
        os.close(fd)


def _one(src: Path, tree: Path, work: Path, disk_gib: int) -> dict[str, object]:
    area = work / "area"
    area.mkdir()
    disk = area / "disk.raw"
    make_disk(disk, tree, disk_gib << 30, "raw")
    repo = work / "repo"
    _vml(src, repo, "init", str(repo))
    out: dict[str, object] = {}
    for save in ("first", "later"):
        if save == "later":  # 4 MiB over the disk's largest run of data
            fd = os.open(disk, os.O_RDONLY)
            runs = data_ranges(fd, disk_gib << 30, skip_unwritten=True)
            os.close(fd)
            start = max(runs, key=lambda r: r[1] - r[0])[0]
            with open(disk, "r+b") as f:
                f.seek(start + MIB)
                f.write(os.urandom(4 * MIB))
        _cache(disk)
        seek, written = _data(disk)
        seconds, rchar, doc = _vml(src, repo, "commit", str(area), "-m", save)
        out[save] = {
            "seconds": round(seconds, 2),
            "read_bytes": doc["read_bytes"],
            "rchar": rchar,
            "seek_data": seek,
            "written_data": written,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--disk-gib", type=int, default=64, help="virtual size of the raw disk")
    p.add_argument("--fill-mib", type=int, default=512, help="files in its ext4 (W2's mix)")
    p.add_argument("--vml-src", type=Path, action="append", help="vml source folder (repeat)")
    p.add_argument("--scratch", type=Path, default=None, help="work folder (default: a temp dir)")
    args = p.parse_args()
    srcs = args.vml_src or [Path(__file__).resolve().parent.parent]
    base = Path(tempfile.mkdtemp(prefix="vml-unwritten-", dir=args.scratch))
    try:
        tree = base / "tree"
        tree.mkdir()
        make_tree(tree, GuestData.for_fill(args.fill_mib), 1)
        for i, src in enumerate(srcs):
            work = base / f"run{i}"
            work.mkdir()
            res = _one(src.resolve(), tree, work, args.disk_gib)
            shutil.rmtree(work)
            print(f"{src}:")
            for save, r in res.items():
                assert isinstance(r, dict)
                print(
                    f"  {save} save: read_bytes {r['read_bytes'] / MIB:.1f} MiB, "
                    f"rchar {r['rchar'] / MIB:.1f} MiB, {r['seconds']} s; disk data "
                    f"{r['seek_data'] / MIB:.1f} MiB by SEEK_DATA, "
                    f"{r['written_data'] / MIB:.1f} MiB written"
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
