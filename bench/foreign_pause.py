"""Live saves of VMs VML did not start: the pause, and the ways not chosen (issue 11).

    python bench/foreign_pause.py                     # both, 256 MiB guest, 4 saves each
    python bench/foreign_pause.py --via qmp --saves 6 --memory 512

The real Linux guest of ``tests/guest/build.py`` works in a loop (TCG) and
is saved every ``--interval`` seconds, alternating the way VML does it and
the alternative it was chosen over, on the same running guest:

- ``qmp``: a QEMU started here with its own command line and QMP socket.
  VML (``vml commit --qmp``): migration while the guest runs, QEMU pauses
  it for the last round, the disk copied while paused, ``cont``.  The
  alternative: ``stop`` first, then the whole migration and the copy.
  The pause is QEMU's STOP event to its RESUME event.
- ``libvirt``: a libvirt domain (a daemon is started as ``tests/libvirtd.py``
  does where none runs).  VML (``vml commit``): an external snapshot with
  ``--memspec``, the guest on overlays while the save reads the area's
  images, ``blockcommit`` after.  The alternative: ``virsh save``, copy the
  disk, ``virsh restore``: the guest is down for all three.

Reported per save: the pause, the state's size, and for VML's saves what
was stored and the whole commit's time.  ``--json FILE`` keeps it all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.guest.build import Guest, build_guest
from tests.libvirtd import URI, _locked, _start, _up, domain_xml
from vml.plumbing.repository import Repository, init_repository
from vml.plumbing.vm.qemu import copy_sparse
from vml.plumbing.vm.qmp import QMPClient, is_listening
from vml.porcelain.commit import commit
from vml.porcelain.log import show

MARK = re.compile(r"VML-MARK (.*?) boot=(\S+) uptime=([\d.]+)")


def _wait(console: Path, pattern: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, console.read_text(errors="replace") if console.exists() else ""):
        if time.monotonic() > deadline:
            raise SystemExit(f"the guest did not reach {pattern!r}")
        time.sleep(0.1)


def _area(guest: Guest, area: Path) -> None:
    area.mkdir(parents=True)
    subprocess.run(["cp", "--sparse=always", str(guest.root), str(area / "root.img")], check=True)
    for src, name in ((guest.kernel, "vmlinuz"), (guest.initrd, "initrd.gz")):
        (area / name).write_bytes(src.read_bytes())


def _stamp(ev: dict[str, object]) -> float:
    ts = ev["timestamp"]
    assert isinstance(ts, dict)
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


def _qmp_alternative(sock: Path, area: Path, scratch: Path, stop_first: bool) -> dict[str, object]:
    """The ways not chosen for QMP: the migration, then the disk copied while QEMU is paused.

    ``stop_first``: the guest is stopped before the migration, not for its
    last round only.
    """
    state = scratch / "alternative.migstream"
    with QMPClient.connect(sock) as c:
        if stop_first:
            c.execute("stop")
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        c.execute("getfd", {"fdname": "b"}, fds=[fd])
        os.close(fd)
        c.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        c.execute("migrate", {"uri": "fd:b"})
        while c.execute("query-migrate").get("status") != "completed":
            time.sleep(0.002)
        t = time.monotonic()
        copied = copy_sparse(area / "root.img", scratch / "alternative.img")
        took = time.monotonic() - t
        c.execute("cont")
        c.execute("migrate-set-parameters", {"max-bandwidth": 128 << 20})
        c.execute("query-status")
        ev = {e["event"]: _stamp(e) for e in c.events}
    return {
        "pause_s": ev["RESUME"] - ev["STOP"],
        "state_bytes": state.stat().st_size,
        "copy_s": took,
        "copied_bytes": copied,
    }


def _save_restore(name: str, area: Path, scratch: Path) -> dict[str, object]:
    """The alternative for libvirt: virsh save, copy the disk, virsh restore."""
    state = scratch / "save-restore.save"
    t = time.monotonic()
    subprocess.run(["virsh", "-c", URI, "save", name, str(state), "--running"], check=True,
                   capture_output=True)  # fmt: skip
    copy_sparse(area / "root.img", scratch / "save-restore.img")
    subprocess.run(["virsh", "-c", URI, "restore", str(state)], check=True, capture_output=True)
    return {"pause_s": time.monotonic() - t, "state_bytes": state.stat().st_size}


def _vml(repo: Repository, area: Path, n: int, **kw: Any) -> dict[str, object]:
    res = commit(repo, area, message=f"save {n}", **kw)
    live = res.live or {}
    sizes = {f.path: f.size for f in show(repo, res.entry).files}
    return {
        "pause_s": live.get("pause_seconds"),
        "state_bytes": sizes.get(str(live.get("state_file"))),
        "stored_bytes": res.stored_bytes,
        "seconds": res.seconds,
        "steps": live.get("steps"),
    }


def _rounds(
    console: Path, saves: int, interval: float, ours: Callable[[int], dict[str, object]],
    others: dict[str, Callable[[], dict[str, object]]],
) -> list[dict[str, object]]:  # fmt: skip
    rows = []
    for n in range(1, saves + 1):
        time.sleep(interval)
        rows.append({"how": "vml", **ours(n)})
        for how, other in others.items():
            time.sleep(interval)
            rows.append({"how": how, **other()})
    _wait(console, r"VML-MARK session=\d+ done")
    return rows


def bench_qmp(guest: Guest, scratch: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    area, sock = scratch / "qmp" / "physics", scratch / "qmp.sock"
    _area(guest, area)
    console = area / "console.log"
    user = subprocess.Popen(
        ["qemu-system-x86_64", "-name", "physics", "-machine", "q35", "-accel", "tcg",
         "-m", str(args.memory), "-nodefaults", "-display", "none",
         "-kernel", str(area / "vmlinuz"), "-initrd", str(area / "initrd.gz"),
         "-append", guest.append(sessions=0, pause=0.5),
         "-drive", f"file={area / 'root.img'},format=raw,if=virtio",
         "-chardev", f"file,id=con,path={console},append=on", "-serial", "chardev:con",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not is_listening(sock):
            time.sleep(0.05)
        _wait(console, r"session=1 start")
        repo = init_repository(scratch / "qmp-repo")
        return _rounds(
            console, args.saves, args.interval,
            lambda n: _vml(repo, area, n, qmp=sock),
            {
                "copy in pause": lambda: _qmp_alternative(sock, area, scratch, False),
                "stop first": lambda: _qmp_alternative(sock, area, scratch, True),
            },
        )  # fmt: skip
    finally:
        user.kill()
        user.wait()


def bench_libvirt(guest: Guest, scratch: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    started = None
    with _locked():
        if not _up():
            started = _start()
    area = scratch / "libvirt" / "physics"
    _area(guest, area)
    name = f"vml-bench-{os.getpid()}"
    boot = ("vmlinuz", "initrd.gz", guest.append(sessions=0, pause=0.5))
    (scratch / "dom.xml").write_text(domain_xml(name, area, "root.img", args.memory, boot))
    subprocess.run(["virsh", "-c", URI, "create", str(scratch / "dom.xml")], check=True,
                   capture_output=True)  # fmt: skip
    try:
        _wait(area / "console.log", r"session=1 start")
        repo = init_repository(scratch / "libvirt-repo")
        return _rounds(
            area / "console.log", args.saves, args.interval,
            lambda n: _vml(repo, area, n),
            {"save+restore": lambda: _save_restore(name, area, scratch)},
        )  # fmt: skip
    finally:
        subprocess.run(["virsh", "-c", URI, "destroy", name], capture_output=True)
        if started is not None:
            os.kill(started, 15)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module doc."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--via", choices=("qmp", "libvirt", "both"), default="both")
    p.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between saves")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    guest = build_guest()
    out: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory(prefix="vml-foreign-") as tmp:
        for via in ("qmp", "libvirt") if args.via == "both" else (args.via,):
            out[via] = (bench_qmp if via == "qmp" else bench_libvirt)(guest, Path(tmp), args)
    for via, rows in out.items():
        print(f"\n{via}, {args.memory} MiB guest")
        for how in dict.fromkeys(str(r["how"]) for r in rows):
            pauses = [float(r["pause_s"]) for r in rows if r["how"] == how and r["pause_s"]]  # type: ignore[arg-type]
            sizes = [r.get("state_bytes") for r in rows if r["how"] == how]
            print(
                f"  {how:<14} pauses {', '.join(f'{x:.2f}' for x in pauses)} s; "
                f"median {statistics.median(pauses):.2f} s; state {sizes}"
            )
        for r in rows:
            if r["how"] == "vml":
                print(f"    vml save: stored {r['stored_bytes']} B in {r['seconds']:.2f} s; "
                      f"steps {r['steps']}")  # fmt: skip
            elif "copy_s" in r:
                print(f"    {r['how']}: copied {r['copied_bytes']} B in {r['copy_s']:.3f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
