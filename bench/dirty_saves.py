"""A later save follows what changed, not the disk's size: 2 GiB against 64 GiB disks.

    python bench/dirty_saves.py                      # raw and qcow2, 2 and 64 GiB, 512 MiB data
    python bench/dirty_saves.py --data 256 --changed 16 --sizes 2,64,256

For each disk format and virtual size, a VM (SeaBIOS and an idle 16 MiB
guest under ``vml run``, TCG) has one disk holding ``--data`` MiB spread
over its size.  E1 is its first live save; then ``--changed`` MiB are
written through QEMU (HMP ``qemu-io``, 64 KiB writes spread over the data,
so its dirty bitmap sees them) and E2 is a live save (the bitmap says what
to read); then the same amount is written again through QEMU, the VM is
saved and stopped (``vml stop --save``) and E3 is a save at rest (a
qcow2's bitmap through ``qemu-nbd -B``; a raw disk has none at rest and is
read whole).  Reported
per save: seconds, bytes read, bytes stored, the pause, and the commit's
notes.  Output: a table, and ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vml.plumbing.repository import init_repository
from vml.plumbing.vm.qemu import RunPaths
from vml.plumbing.vm.qmp import QMPClient
from vml.porcelain.commit import CommitResult, commit
from vml.porcelain.run import run
from vml.porcelain.stop import stop
from vml.porcelain.vminit import vm_init

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 8 * MiB


def _make_disk(path: Path, fmt: str, size: int, data: int) -> list[int]:
    """A disk of ``size`` holding ``data`` bytes in 8 MiB chunks spread over it; their offsets."""
    n = max(1, data // CHUNK)
    offsets = [(size // n) * i // CHUNK * CHUNK for i in range(n)]
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    cmds = [
        a for i, off in enumerate(offsets) for a in ("-c", f"write -P {i % 250 + 1} {off} {CHUNK}")
    ]
    subprocess.run(["qemu-io", "-f", fmt, *cmds, str(path)], check=True, capture_output=True)
    return offsets


def _guest_writes(area: Path, offsets: list[int], changed: int, pattern: int) -> None:
    """``changed`` bytes in 64 KiB writes spread over the data, through QEMU."""
    writes = changed // (64 << 10)
    with QMPClient.connect(RunPaths(area).qmp) as c:
        for i in range(writes):
            off = offsets[i % len(offsets)] + (i // len(offsets)) * (64 << 10) * 3
            c.execute(
                "human-monitor-command",
                {"command-line": f'qemu-io vml-disk0 "write -P {pattern} {off} 64k"'},
            )


def _row(kind: str, res: CommitResult, seconds: float) -> dict[str, object]:
    live = res.live or {}
    return {
        "save": kind,
        "seconds": round(seconds, 3),
        "read_bytes": res.read_bytes,
        "stored_bytes": res.stored_bytes,
        "pause_s": live.get("pause_seconds"),
        "steps": live.get("steps"),
        "notes": res.notes,
    }


def one(scratch: Path, fmt: str, size: int, data: int, changed: int) -> list[dict[str, object]]:
    """The three saves of one disk; see the module doc."""
    area = scratch / f"{fmt}-{size >> 30}g"
    area.mkdir()
    disk = area / f"disk.{fmt}"
    offsets = _make_disk(disk, fmt, size, data)
    vm_init(area, disks=[disk], memory="16M", network="none")
    repo = init_repository(scratch / f"repo-{fmt}-{size >> 30}g")
    rows = []
    try:
        run(area, accel="tcg")
        t = time.monotonic()
        rows.append(_row("E1 live, first", commit(repo, area), time.monotonic() - t))
        _guest_writes(area, offsets, changed, 201)
        t = time.monotonic()
        rows.append(_row("E2 live", commit(repo, area), time.monotonic() - t))
        _guest_writes(area, offsets, changed, 202)
        stop(area, save=True)
        t = time.monotonic()
        rows.append(_row("E3 at rest", commit(repo, area), time.monotonic() - t))
    finally:
        pid = RunPaths(area).pidfile
        if pid.exists():
            stop(area, force_kill=True)
        repo.close()
        shutil.rmtree(area, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module doc."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2,64", help="virtual sizes in GiB, comma-separated")
    p.add_argument("--formats", default="raw,qcow2")
    p.add_argument("--data", type=int, default=512, help="MiB of data on each disk")
    p.add_argument("--changed", type=int, default=16, help="MiB written between saves")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="vml-dirty-", dir=args.dir))
    results: dict[str, list[dict[str, object]]] = {}
    try:
        for fmt in args.formats.split(","):
            for gib in (int(s) for s in args.sizes.split(",")):
                results[f"{fmt} {gib} GiB"] = one(
                    scratch, fmt, gib * GiB, args.data * MiB, args.changed * MiB
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.data} MiB of data, {args.changed} MiB changed between saves")
    print(f"{'disk':>14} {'save':>16} {'seconds':>8} {'read':>10} {'stored':>10} {'pause':>7}")
    for name, rows in results.items():
        for r in rows:
            pause = "" if r["pause_s"] is None else f"{r['pause_s']}"
            print(
                f"{name:>14} {r['save']:>16} {r['seconds']:>8} "
                f"{int(r['read_bytes']) / MiB:>8.1f}Mi {int(r['stored_bytes']) / MiB:>8.1f}Mi "  # type: ignore[call-overload]
                f"{pause:>7}"
            )
            if r["steps"]:
                print(f"{'':>16} steps: {r['steps']}")
            for note in r["notes"]:  # type: ignore[attr-defined]
                print(f"{'':>16} note: {note}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
