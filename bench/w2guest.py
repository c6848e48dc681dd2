"""The real guest of workload W2: its disk, its work sessions, and driving it with ``vml run``.

The guest is the Linux of ``tests/guest/build.py`` (Debian's cloud kernel, a
busybox initramfs that mounts ``/dev/vda``); W2 gives it its own root disk:

* an ext4 made by ``mke2fs -d`` on a sparse file of the disk's virtual size
  (64 GiB by default), holding busybox, this module's ``/sbin/init`` and
  ~``fill_mib`` of real files: system documents, tar archives of real
  software trees (``/usr/include``, Python's library, Perl, man pages),
  measurement text, experiment data (half bytes of this machine's
  libraries, half random) and a ``big.bin`` of random bytes;
* kept raw (``disk.raw``) or converted to qcow2 (``disk.qcow2``, holes left
  unallocated), described for ``vml run`` with ``vml vm init`` (RAM in the
  area's ``physics.ram``).

A work session, done by the guest itself (``session`` in the init script):
untar one of the archives into ``/work/sK``, tar and gzip it to ``/out``,
process measurement text with ``awk`` and ``sort``, overwrite part of
``big.bin`` in place with random bytes, copy real bytes from one data file
over part of another in place, delete the output of two sessions ago, sync.
The ``done`` marker says how many KiB the guest wrote to its disk in the
session (``/sys/block/vda/stat``), a cross-check of what the host measures.

Kernel arguments: ``vml.w2=wait`` (a session per ACPI power-button press,
the VM staying up between), ``vml.w2=once`` (one session, then power off),
``vml.write=MIB`` (instead of a session: overwrite MIB of ``big.bin`` in
place and power off). The next session's number is kept on the disk
(``/var/w2/next``), so sessions go on across boots and resumes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.workload import _copy_system_files, real_bytes

MIB = 1 << 20
NAME = "physics"
"""The VM's name: its files are ``physics.qemu.json``, ``physics.ram``, ``physics.vmstate``."""

# Real software trees the guest's archives are made of (what it untars).
PACKAGE_TREES = (
    ("/usr/include",),
    ("/usr/lib/python3.11", "/usr/lib/python3"),
    ("/usr/share/perl", "/usr/share/perl5", "/usr/share/doc"),
    ("/usr/share/man",),
)
MEAS_FILES = 4
MARK = re.compile(r"VML-MARK (.*?) boot=(\S+) uptime=([\d.]+)")
WAIT = 600.0  # TCG on two busy cores: generous; never a measured time

GUEST_INIT = r"""#!/bin/sh
# VML bench W2: a physicist's work sessions, done by the guest.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
boot=$(cat /proc/sys/kernel/random/boot_id)
mark() { echo "VML-MARK $* boot=$boot uptime=$(cut -d' ' -f1 /proc/uptime)"; }
written() { set -- $(cat /sys/block/vda/stat); echo $(( $7 / 2 )); }
mode=wait; write=0
for a in $(cat /proc/cmdline); do
  case $a in
    vml.w2=*) mode=${a#*=} ;;
    vml.write=*) write=${a#*=} ;;
  esac
done
# The ACPI power button: each press (EV_KEY, value 1) adds a line to /run/presses.
# The device stays open (fd 3), so no press is lost between two reads.
for ev in /sys/class/input/event*; do
  if grep -q "Power Button" "$ev/device/name" 2>/dev/null; then
    ( exec 3</dev/input/${ev##*/}
      while :; do
        set -- $(dd bs=24 count=1 <&3 2>/dev/null | od -An -tu2 -j16 -N6)
        [ "$1" = 1 ] && [ "$3" = 1 ] && echo press >> /run/presses
      done ) &
  fi
done
off() {
  sync
  mount -o remount,ro / || sync
  mark poweroff
  poweroff -f
}
session() {
  k=$1; w0=$(written)
  mark session=$k start
  mkdir -p /work/s$k /out
  tar -xf /data/src/pkg$(( k % @NPKG@ )).tar -C /work/s$k
  mark session=$k untarred
  tar -cf - -C /work/s$k . | gzip -1 > /out/s$k.tar.gz
  mark session=$k compressed
  m=/data/meas/m$(( k % @NMEAS@ )).txt
  awk '{n[$1]++; s[$1]+=$3} END {for (w in n) print w, n[w], s[w]/n[w]}' $m > /out/s$k.sum
  sort -k3 -g $m > /out/s$k.sorted
  mark session=$k processed
  dd if=/dev/urandom of=/data/big.bin bs=65536 count=@OVER@ \
     seek=$(( (k * @OVER@) % @BIGSPAN@ )) conv=notrunc 2>/dev/null
  a=$(( k % @NRUNS@ )); b=$(( (k + 1) % @NRUNS@ ))
  dd if=/data/runs/run$a.dat of=/data/runs/run$b.dat bs=65536 count=@COPY@ \
     skip=$(( (k * 7) % @RUNSPAN@ )) seek=$(( (k * 3) % @RUNSPAN@ )) conv=notrunc 2>/dev/null
  rm -rf /work/s$(( k - 2 )) /out/s$(( k - 2 )).*
  echo $(( k + 1 )) > /var/w2/next
  sync
  mark session=$k done written_kib=$(( $(written) - w0 ))
}
mkdir -p /work /out /var/w2
next() { cat /var/w2/next 2>/dev/null || echo 1; }
mark boot mode=$mode write=$write
if [ "$write" != 0 ]; then
  w0=$(written)
  dd if=/dev/urandom of=/data/big.bin bs=1048576 count=$write conv=notrunc 2>/dev/null
  sync
  mark write done written_kib=$(( $(written) - w0 ))
  off
elif [ "$mode" = once ]; then
  session $(next)
  off
fi
mark ready
seen=0
while :; do
  n=$(cat /run/presses 2>/dev/null | wc -l)
  if [ "$n" -gt "$seen" ]; then
    seen=$n
    session $(next)
  fi
  sleep 0.2
done
"""


@dataclass(frozen=True)
class GuestData:
    """Sizes of what the guest's disk holds and its sessions write (bytes)."""

    fill: int
    package: int
    meas: int
    run: int
    runs: int
    big: int
    over: int  # big.bin bytes overwritten per session
    copy: int  # bytes copied from one run file over another per session

    @classmethod
    def for_fill(cls, fill_mib: int, write_mib: int = 0) -> GuestData:
        """Proportions of W2 for ``fill_mib`` of files (512: ~25 MiB archives, 4 MiB overwrites)."""
        fill = fill_mib * MIB
        block = 64 << 10

        def blocks(n: int) -> int:
            return max(block, n // block * block)

        package = blocks(fill // 20)
        meas = blocks(fill // 128)
        run = blocks(fill // 32)
        big = max(blocks(fill // 8), write_mib * MIB)
        rest = fill - fill // 8 - 4 * package - MEAS_FILES * meas - big
        return cls(
            fill=fill,
            package=package,
            meas=meas,
            run=run,
            runs=max(2, rest // run),
            big=big,
            over=blocks(fill // 128),
            copy=blocks(fill // 256),
        )

    def init_script(self) -> str:
        """``/sbin/init`` with this data's sizes filled in."""
        block = 64 << 10
        values = {
            "NPKG": len(PACKAGE_TREES),
            "NMEAS": MEAS_FILES,
            "OVER": self.over // block,
            "BIGSPAN": max(1, (self.big - self.over) // block),
            "NRUNS": self.runs,
            "COPY": self.copy // block,
            "RUNSPAN": max(1, (self.run - self.copy) // block),
        }
        text = GUEST_INIT
        for key, value in values.items():
            text = text.replace(f"@{key}@", str(value))
        return text


def _package_files(trees: tuple[str, ...]) -> list[str]:
    files: list[str] = []
    for tree in trees:
        for root, dirs, names in os.walk(tree):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(root, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    files.append(path)
    return files


def _package(path: Path, trees: tuple[str, ...], budget: int) -> None:
    """A tar of real files from ``trees`` up to ``budget`` bytes (what the guest untars)."""
    files = _package_files(trees)
    total = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, src in enumerate(files * 4):  # a small tree is repeated under other names
            size = os.path.getsize(src)
            if total + size > budget:
                if total:
                    break
                continue
            try:
                info = tar.gettarinfo(src, arcname=f"r{i // max(1, len(files))}/{src.lstrip('/')}")
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                with open(src, "rb") as f:
                    tar.addfile(info, f)
            except (OSError, ValueError):
                continue
            total += size


def _measurements(rng: random.Random, size: int) -> bytes:
    words = ("run", "event", "energy", "muon", "jet", "track", "hit", "calib")
    lines: list[str] = []
    total = 0
    while total < size:
        line = f"{rng.choice(words)} {rng.randint(0, 10**6)} {rng.random():.6f} {rng.gauss(0, 1):.4f}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def make_tree(tree: Path, data: GuestData, seed: int) -> None:
    """The guest's root file system, as a folder: busybox, the init script, the data."""
    rng = random.Random(seed)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "var/w2"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    busybox = Path("/bin/busybox")
    shutil.copy2(busybox, tree / "bin" / "busybox")
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (tree / "bin" / applet).exists():
            (tree / "bin" / applet).symlink_to("busybox")
    init = tree / "sbin" / "init"
    init.write_text(data.init_script())
    init.chmod(0o755)
    root = tree / "data"
    _copy_system_files(root / "docs", data.fill // 8)
    (root / "src").mkdir(parents=True)
    for i, trees in enumerate(PACKAGE_TREES):
        _package(root / "src" / f"pkg{i}.tar", trees, data.package)
    (root / "meas").mkdir()
    for i in range(MEAS_FILES):
        (root / "meas" / f"m{i}.txt").write_bytes(_measurements(rng, data.meas))
    (root / "runs").mkdir()
    for i in range(data.runs):
        # Half real bytes (compressible, found again elsewhere), half random.
        blob = real_bytes(rng, data.run) if i % 2 == 0 else rng.randbytes(data.run)
        (root / "runs" / f"run{i}.dat").write_bytes(blob)
    (root / "big.bin").write_bytes(rng.randbytes(data.big))


def make_disk(path: Path, tree: Path, virtual_bytes: int, fmt: str) -> None:
    """An ext4 of ``tree`` on a sparse disk of ``virtual_bytes``: raw, or qcow2 (64 KiB clusters)."""
    raw = path if fmt == "raw" else path.with_suffix(".tmp.raw")
    with open(raw, "wb") as f:
        f.truncate(virtual_bytes)
    subprocess.run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-L", "vmlroot", "-d", str(tree),
            "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw),
        ],
        check=True,
    )  # fmt: skip
    if fmt == "qcow2":
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
        )
        raw.unlink()


class GuestVM:
    """The W2 guest in one area, driven through VML's CLI (``vml vm init/run/stop``)."""

    def __init__(self, area: Path, vml_src: Path, accel: str | None = None) -> None:
        self.area = area
        self.vml_src = vml_src
        self.accel = accel

    @property
    def run_dir(self) -> Path:
        return self.area / ".vml" / "run"

    def vml(self, *args: str) -> str:
        """Run ``python -m vml ARGS`` from the benchmarked source; its stdout."""
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{self.vml_src}{os.pathsep}{path}" if path else str(self.vml_src)
        done = subprocess.run(
            [sys.executable, "-m", "vml", *args],
            cwd=self.vml_src,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"vml {' '.join(args)} exited {done.returncode}: {done.stderr[-600:]}"
            )
        return done.stdout

    def describe(self, disk: Path, ram_mib: int, kernel: Path, initrd: Path, append: str) -> None:
        """``vml vm init``: the disk, RAM in ``physics.ram``, the guest's kernel and initrd."""
        self.vml(
            "vm", "init", str(self.area), "--name", NAME, "--disk", str(disk),
            "--memory", f"{ram_mib}M", "--kernel", str(kernel), "--initrd", str(initrd),
            "--append", append, "--network", "none", "--qemu-arg=-no-reboot", "--force",
        )  # fmt: skip

    def start(self) -> None:
        """``vml run``: boot, or resume the saved running state."""
        self.vml("run", str(self.area), *(["--accel", self.accel] if self.accel else []))

    def marks(self) -> list[tuple[str, str, float]]:
        """The guest's markers so far (all boots): (what, boot id, uptime)."""
        try:
            text = (self.run_dir / "console.log").read_text(errors="replace")
        except OSError:
            return []
        return [(m[1], m[2], float(m[3])) for m in MARK.finditer(text)]

    def wait_mark(self, pattern: str, after: int = 0) -> tuple[int, str]:
        """Wait for a marker matching ``pattern`` among markers ``after`` on: (count, marker)."""
        deadline = time.monotonic() + WAIT
        while True:
            seen = self.marks()
            for what, _, _ in seen[after:]:
                if re.search(pattern, what):
                    return len(seen), what
            if (self.run_dir / "exit").exists() and not self.running():
                raise RuntimeError(f"the guest's QEMU ended before {pattern!r}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern!r} from the guest in {WAIT:.0f} s: {self.tail()}")
            time.sleep(0.1)

    def tail(self, lines: int = 4) -> str:
        """The last lines of the serial console and of QEMU's log, for an error message."""
        out = []
        for name in ("console.log", "qemu.log"):
            try:
                text = (self.run_dir / name).read_text(errors="replace").strip().splitlines()
            except OSError:
                continue
            out.append(f"{name}: " + " / ".join(t.strip() for t in text[-lines:]))
        return "; ".join(out) or "no console output"

    def running(self) -> bool:
        """Whether QEMU runs for this area (its pid file names a live process)."""
        try:
            pid = int((self.run_dir / "qemu.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return False
        return not (self.run_dir / "exit").exists()

    def wait_off(self) -> None:
        """Wait until QEMU ended (the guest powered off)."""
        deadline = time.monotonic() + WAIT
        while self.running() or not (self.run_dir / "exit").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the guest did not power off")
            time.sleep(0.1)

    def press(self) -> None:
        """The ACPI power button, through QMP: the guest starts its next session."""
        sock_path = self.run_dir / "qmp.sock"
        address = str(sock_path)
        if len(address.encode()) > 107:
            address = os.path.realpath(address)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(address)
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", "system_powerdown"):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply:
                        break
                    if "error" in reply:
                        raise RuntimeError(f"QMP {cmd}: {reply['error']}")

    def save_and_stop(self) -> None:
        """``vml stop --save``: the guest's state to ``physics.vmstate``, RAM in ``physics.ram``."""
        self.vml("stop", str(self.area), "--save", "--timeout", str(WAIT))

    def kill(self) -> None:
        """``vml stop --kill`` if it runs."""
        if self.running():
            self.vml("stop", str(self.area), "--kill")


def append_line(mode: str, write_mib: int = 0) -> str:
    """The guest's kernel command line for ``mode`` (wait, once) and an optional write."""
    extra = f" vml.write={write_mib}" if write_mib else ""
    return f"console=ttyS0 quiet panic=-1 vml.w2={mode}{extra}"


def scratch_tree(parent: Path) -> Path:
    """A temporary folder for the guest's tree, next to where the disk goes (same file system)."""
    return Path(tempfile.mkdtemp(prefix="w2tree-", dir=parent))
