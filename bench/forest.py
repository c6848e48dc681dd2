"""Reshaping the forest costs metadata, not image data (issue #4), measured at GiB size.

    python bench/forest.py                 # 1 GiB disk, 20 entries, rm E10
    python bench/forest.py --disk-mib 256  # quicker

Makes the benchmark workload (a real VMDK of an ext4 filesystem, a .vmem),
saves a full entry and 19 incremental ones (small work sessions), then runs
``vml rm`` on the middle entry and ``vml convert`` of the tip to a
differential and to a full entry, measuring for each: wall time, bytes the
command added to the repository (new packs and loose objects), and whether
every remaining entry still checks out identical to the state it was saved
from. Then ``vml gc`` and the bytes it frees. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import WorkloadSpec, hash_area, make_area, run_session

ROOT = Path(__file__).resolve().parent.parent


def vml(repo: Path, *args: str) -> tuple[float, str]:
    """Run vml; returns (seconds, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "vml", "--repo", str(repo), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"vml {' '.join(args)} failed: {res.stderr.strip()}")
    return time.monotonic() - t, res.stdout


def objects_bytes(repo: Path) -> dict[str, int]:
    """Every file under objects/ with its size (packs, indexes, loose objects)."""
    out: dict[str, int] = {}
    for p in (repo / "objects").rglob("*"):
        if p.is_file():
            out[str(p.relative_to(repo))] = p.stat().st_size
    return out


def added(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes in files that are new since ``before``."""
    return sum(size for name, size in after.items() if name not in before)


def main() -> None:
    """Run the measurement."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--fill-mib", type=int, default=256)
    ap.add_argument("--vmem-mib", type=int, default=128)
    ap.add_argument("--change-mib", type=int, default=4)
    ap.add_argument("--entries", type=int, default=20)
    ap.add_argument("--scratch", type=Path, default=ROOT / "bench" / "out" / "forest-scratch")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "forest.json")
    o = ap.parse_args()
    spec = WorkloadSpec(o.disk_mib, o.fill_mib, o.vmem_mib, o.change_mib, seed=7)
    shutil.rmtree(o.scratch, ignore_errors=True)
    o.scratch.mkdir(parents=True)
    repo, area = o.scratch / "repo", o.scratch / "area"
    vml(repo, "init", str(repo))
    make_area(area, spec)
    states: dict[str, dict[str, str]] = {}
    for i in range(1, o.entries + 1):
        if i > 1:
            run_session(area, i, spec)
        # No -q: it prints nothing now; without a terminal no bar is drawn anyway.
        _t, out = vml(repo, "commit", str(area), "-m", f"state {i}")
        states[out.split()[0]] = hash_area(area)
    middle = f"E{o.entries // 2}"
    tip = f"E{o.entries}"
    logical = sum(p.stat().st_size for p in area.iterdir() if p.is_file())
    rows = []
    for label, args in (
        (f"rm {middle} (chain of {o.entries})", ["rm", middle]),
        (f"convert {tip} --to differential", ["convert", tip, "--to", "differential"]),
        (f"convert {tip} --to full", ["convert", tip, "--to", "full"]),
    ):
        before = objects_bytes(repo)
        seconds, _ = vml(repo, *args)
        rows.append(
            {
                "operation": label,
                "seconds": seconds,
                "bytes_written": added(before, objects_bytes(repo)),
            }
        )
        if label.startswith("rm"):
            states.pop(middle)
    identical = True
    for entry, want in states.items():
        dest = o.scratch / f"co-{entry}"
        vml(repo, "checkout", entry, str(dest), "-q")
        identical &= hash_area(dest) == want
        shutil.rmtree(dest)
    before_gc = sum(objects_bytes(repo).values())
    seconds, _ = vml(repo, "gc", "-q")
    freed = before_gc - sum(objects_bytes(repo).values())
    rows.append({"operation": "gc", "seconds": seconds, "bytes_written": -freed})
    result = {
        "params": vars(o) | {"scratch": str(o.scratch), "out": str(o.out)},
        "image_bytes": logical,
        "rows": rows,
        "all_entries_identical": identical,
    }
    print(f"area: {logical / 2**20:.0f} MiB of VM files, {o.entries} entries")
    print(f"{'operation':<40} {'seconds':>8} {'bytes written':>14}")
    for r in rows:
        print(f"{r['operation']:<40} {r['seconds']:8.2f} {r['bytes_written']:14,d}")
    print(f"every remaining entry checks out identical: {identical}")
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(o.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
