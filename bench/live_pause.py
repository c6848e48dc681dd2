"""How long a live save pauses a running guest: the real Linux guest, a real QEMU.

    python bench/live_pause.py                  # 256 MiB guest, 6 live commits ~4 s apart
    python bench/live_pause.py --memory 512 --saves 10 --interval 2
    python bench/live_pause.py --rebuild        # also time building the guest afresh
    python bench/live_pause.py --format qcow2 --extra-disk 1024   # a qcow2 root, and a 1 GiB
                                                # data disk the guest never writes

Builds (or reuses) the guest of ``tests/guest/build.py``, starts it with
``vml run`` (TCG) working in a loop (untar, compress, overwrite, delete,
sync), and saves it with ``vml commit`` (the porcelain, in this process)
every ``--interval`` seconds while it works.  For each save it reports the
pause the guest saw (QMP ``stop`` to ``cont`` returning), its steps (stop,
device state, copies, cont), the data copied while paused, how much of the
disk changed since the previous save (the guest's own writes), and the
whole commit's time.  The guest's uptime and boot id are checked to go on
across the saves.  Output: a table on stdout and ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.guest.build import build_guest
from vml.plumbing.repository import init_repository
from vml.plumbing.vm.qemu import RunPaths, vml_vm
from vml.porcelain.commit import commit
from vml.porcelain.run import run
from vml.porcelain.stop import stop
from vml.porcelain.vminit import vm_init

MARK = re.compile(r"VML-MARK (.*?) boot=(\S+) uptime=([\d.]+)")


def _marks(area: Path) -> list[tuple[str, str, float]]:
    text = RunPaths(area).console.read_text(errors="replace")
    return [(m[1], m[2], float(m[3])) for m in MARK.finditer(text)]


def _wait_for(area: Path, pattern: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, w) for w, _, _ in _marks(area)):
        if time.monotonic() > deadline or vml_vm(area) is None:
            raise SystemExit(f"the guest did not reach {pattern!r}")
        time.sleep(0.1)


def _changed_bytes(old: Path | None, new: Path, block: int = 65536) -> int:
    """Bytes in 64 KiB blocks that differ between two copies of the disk."""
    if old is None:
        return 0
    changed = 0
    with open(old, "rb") as a, open(new, "rb") as b:
        while True:
            x, y = a.read(block), b.read(block)
            if not x and not y:
                return changed
            if x != y:
                changed += max(len(x), len(y))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module doc."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    p.add_argument("--saves", type=int, default=6)
    p.add_argument("--interval", type=float, default=4.0, help="seconds between saves")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--rebuild", action="store_true", help="build the guest afresh and time it")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="the root disk's")
    p.add_argument(
        "--extra-disk",
        type=int,
        default=0,
        metavar="MIB",
        help="add a raw disk holding this many MiB of data the guest never writes",
    )
    args = p.parse_args(argv)

    guest = build_guest(force=args.rebuild)
    scratch = Path(tempfile.mkdtemp(prefix="vml-live-", dir=args.dir))
    area, repo_path = scratch / "physics", scratch / "repo"
    area.mkdir()
    root = area / ("root.img" if args.format == "raw" else "root.qcow2")
    if args.format == "raw":
        subprocess.run(["cp", "--sparse=always", str(guest.root), str(root)], check=True)
    else:
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(guest.root), str(root)], check=True
        )
    disks = [root]
    if args.extra_disk:
        with open(area / "data.img", "wb") as f:
            for _ in range(args.extra_disk):
                f.write(os.urandom(1 << 20))
        disks.append(area / "data.img")
    vm_init(
        area,
        disks=disks,
        memory=f"{args.memory}M",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append(sessions=0, pause=0),
        network="none",
        qemu_args=["-no-reboot"],
    )
    repo = init_repository(repo_path)
    rows: list[dict[str, object]] = []
    previous: Path | None = None
    try:
        run(area, accel="tcg")
        _wait_for(area, r"session=1 start")
        boot = _marks(area)[0][1]
        for n in range(1, args.saves + 1):
            time.sleep(args.interval)
            disk_now = scratch / f"disk.{n}"
            t0 = time.monotonic()
            res = commit(repo, area, message=f"live {n}")
            seconds = time.monotonic() - t0
            live = res.live or {}
            # The disk as the guest has it now, against the previous save's copy.
            subprocess.run(["cp", "--sparse=always", str(root), str(disk_now)])
            rows.append(
                {
                    "save": n,
                    "entry": res.entry,
                    "pause_s": live.get("pause_seconds"),
                    "steps": live.get("steps"),
                    "copied_bytes": live.get("copied_bytes"),
                    "read_bytes": res.read_bytes,
                    "notes": getattr(res, "notes", []),
                    "commit_s": round(seconds, 3),
                    "stored_bytes": res.stored_bytes,
                    "disk_changed_bytes": _changed_bytes(previous, disk_now),
                }
            )
            if previous is not None:
                previous.unlink()
            previous = disk_now
        marks = _marks(area)
        assert all(b == boot for _, b, _ in marks), "the guest rebooted"
        uptimes = [u for _, _, u in marks]
        assert uptimes == sorted(uptimes)
        stop(area, force_kill=True)
    finally:
        if vml_vm(area) is not None:
            stop(area, force_kill=True)
        repo.close()
    pauses = [float(r["pause_s"]) for r in rows]  # type: ignore[arg-type]
    summary = {
        "memory_mib": args.memory,
        "disk_mib": root.stat().st_size >> 20,
        "format": args.format,
        "extra_disk_mib": args.extra_disk,
        "guest_build_seconds": round(guest.build_seconds, 2),
        "guest_kernel": guest.kernel_version,
        "pause_median_s": round(statistics.median(pauses), 4),
        "pause_max_s": round(max(pauses), 4),
        "saves": rows,
        "cpus": os.cpu_count(),
    }
    extra = f", {args.extra_disk} MiB data disk" if args.extra_disk else ""
    print(f"guest {guest.kernel_version}, {args.memory} MiB RAM, {args.format} root{extra}, TCG")
    print(f"guest build: {guest.build_seconds:.1f} s ({'afresh' if args.rebuild else 'cached'})")
    print(
        f"{'save':>4} {'entry':>6} {'pause s':>8} {'commit s':>9} {'stored':>10} {'disk changed':>13}"
    )
    for r in rows:
        print(
            f"{r['save']:>4} {r['entry']:>6} {r['pause_s']:>8} {r['commit_s']:>9} "
            f"{int(r['stored_bytes']) / 2**20:>8.1f}Mi {int(r['disk_changed_bytes']) / 2**20:>11.1f}Mi"  # type: ignore[call-overload]
        )
    for r in rows:
        print(
            f"  save {r['save']}: steps {r['steps']}, copied {r['copied_bytes']} bytes, "
            f"read {r['read_bytes']} bytes"
        )
        for note in r["notes"]:  # type: ignore[attr-defined]
            print(f"    note: {note}")
    print(f"pause: median {summary['pause_median_s']} s, max {summary['pause_max_s']} s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
