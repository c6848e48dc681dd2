"""Build a small real Linux guest for tests and benchmarks, from Debian packages only.

    python -m tests.guest.build            # build (or reuse) it, print where it is
    python -m tests.guest.build --force    # build again

What it makes, in a cache folder outside the repository (``$VML_GUEST_CACHE``,
else ``$XDG_CACHE_HOME/vml-guest``, else ``~/.cache/vml-guest``):

- ``vmlinuz``: the kernel of Debian's ``linux-image-*-cloud-amd64`` (the
  package ``linux-image-cloud-amd64`` depends on, fetched with ``apt-get
  download`` and unpacked with ``dpkg-deb -x``; ``/boot`` may be empty here);
- ``initrd.gz``: a ~1 MB busybox initramfs.  That kernel has ext4 built in but
  virtio as modules; ``/init`` ``insmod``s them, retrying until all load (the
  order that works differs between builds of one series), mounts
  ``/dev/vda`` and ``switch_root``s to it;
- ``root.img``: a raw ext4 (``mke2fs -d``) holding busybox, a data set and an
  ``/sbin/init`` that does real work sessions (untar the data set, compress
  it, overwrite a file in place, delete older output, sync), printing
  ``VML-MARK`` lines on the serial console.

Kernel arguments the guest's init reads: ``vml.sessions=N`` (0: forever),
``vml.pause=S`` (seconds between sessions), ``vml.end=poweroff|idle``.  A
press of the ACPI power button (``system_powerdown``) ends the current
session and powers off cleanly.  Every marker line carries the boot id and
the uptime, so a test sees whether a guest was resumed or rebooted.

Needs ``apt-get``, ``dpkg-deb``, ``mke2fs`` (e2fsprogs) and ``busybox-static``;
``qemu-system-x86`` runs it.  ``build_guest`` raises ``GuestUnavailable`` with
the reason when something is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Bump when what is built changes in a way the sources below do not show.
BUILD_VERSION = 1
#: The modules /init loads; the order is found at boot by retrying.
MODULES = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
    "drivers/input/evdev",
    "drivers/acpi/button",
)
ROOT_SIZE = 64 << 20
DATASET_BYTES = 3 << 20
BIG_FILE = 16 << 20
BUSYBOX = "/bin/busybox"

INITRD_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The order that loads differs between kernel builds: retry until all load.
left="MODULES"
for round in 1 2 3 4 5 6 7 8 9 10; do
  next=""
  for m in $left; do
    insmod /lib/modules/$m.ko 2>/dev/null || next="$next $m"
  done
  left="$next"
  [ -z "$left" ] && break
done
[ -n "$left" ] && echo "VML-INITRD could not load:$left"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if ! mount -t ext4 /dev/vda /newroot; then
  echo "VML-INITRD cannot mount /dev/vda"
  poweroff -f
fi
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot /sbin/init
"""

GUEST_INIT = r"""#!/bin/sh
# The work the guest does: sessions of untar, compress, overwrite, delete, sync.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
boot=$(cat /proc/sys/kernel/random/boot_id)
mark() { echo "VML-MARK $* boot=$boot uptime=$(cut -d' ' -f1 /proc/uptime)"; }
sessions=1; pause=0; end=poweroff
for a in $(cat /proc/cmdline); do
  case $a in
    vml.sessions=*) sessions=${a#*=} ;;
    vml.pause=*) pause=${a#*=} ;;
    vml.end=*) end=${a#*=} ;;
  esac
done
# The ACPI power button (QMP system_powerdown): finish the step, power off.
for ev in /sys/class/input/event*; do
  if grep -q "Power Button" "$ev/device/name" 2>/dev/null; then
    (dd if=/dev/input/${ev##*/} of=/dev/null bs=24 count=1 2>/dev/null; touch /run/stop) &
  fi
done
off() {
  sync
  mount -o remount,ro / || sync
  mark poweroff
  poweroff -f
}
mark boot sessions=$sessions
mkdir -p /work /out
n=0
while [ "$sessions" -eq 0 ] || [ $n -lt "$sessions" ]; do
  [ -e /run/stop ] && break
  n=$((n+1))
  mark session=$n start
  mkdir -p /work/s$n && tar -xf /data/set.tar -C /work/s$n
  mark session=$n untarred
  [ -e /run/stop ] && break
  tar -cf - -C /work/s$n . | gzip -1 > /out/s$n.tar.gz
  mark session=$n compressed
  [ -e /run/stop ] && break
  dd if=/dev/urandom of=/data/big.bin bs=65536 count=32 seek=$(( (n * 32) % 224 )) conv=notrunc 2>/dev/null
  old=$((n-2))
  rm -rf /work/s$old /out/s$old.tar.gz
  sync
  mark session=$n done
  [ "$pause" != 0 ] && sleep "$pause"
done
mark all-done sessions=$n
if [ "$end" = idle ] && [ ! -e /run/stop ]; then
  while [ ! -e /run/stop ]; do sleep 1; done
fi
off
"""


class GuestUnavailable(Exception):
    """The guest cannot be built here (a tool or package is missing)."""


@dataclass(frozen=True)
class Guest:
    """A built guest: kernel, initramfs and a root disk image to copy."""

    folder: Path
    kernel: Path
    initrd: Path
    root: Path
    kernel_version: str
    build_seconds: float

    def append(self, sessions: int = 1, pause: float = 0, end: str = "poweroff") -> str:
        """Kernel arguments that boot the root disk and run ``sessions`` work sessions."""
        return f"console=ttyS0 quiet panic=-1 vml.sessions={sessions} vml.pause={pause:g} vml.end={end}"


def cache_root() -> Path:
    """Where built guests are kept (outside the repository)."""
    env = os.environ.get("VML_GUEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vml-guest"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise GuestUnavailable(f"{cmd[0]} is not installed") from e
    if done.returncode != 0:
        raise GuestUnavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
    return done.stdout


def kernel_package() -> str:
    """The versioned kernel package ``linux-image-cloud-amd64`` depends on."""
    text = _run(["apt-cache", "depends", "linux-image-cloud-amd64"])
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise GuestUnavailable("apt-cache knows no linux-image-cloud-amd64 (run apt-get update)")


def _cache_key(package: str) -> str:
    h = hashlib.sha256()
    h.update(f"{BUILD_VERSION}\n{package}\n".encode())
    h.update(INITRD_INIT.encode() + GUEST_INIT.encode())
    h.update(repr((MODULES, ROOT_SIZE, DATASET_BYTES, BIG_FILE)).encode())
    return h.hexdigest()[:16]


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of ``(name, mode, data)``; symlinks carry their target as data."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        pad(110 + len(raw))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def _dataset(seed: int = 11) -> bytes:
    """A tar of text-like files (compressible, like real measurements), about 3 MiB."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    words = [f"{w}" for w in ("run", "event", "energy", "muon", "jet", "track", "hit", "calib")]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        total, i = 0, 0
        while total < DATASET_BYTES:
            lines = []
            for _ in range(rng.randint(200, 2000)):
                lines.append(
                    f"{rng.choice(words)} {rng.randint(0, 10**6)} {rng.random():.6f} "
                    f"{rng.gauss(0, 1):.4f}\n"
                )
            data = "".join(lines).encode()
            info = tarfile.TarInfo(f"set/d{i // 16:02d}/f{i:04d}.txt")
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
            total += len(data)
            i += 1
    return buf.getvalue()


def _initrd(modules: Path, busybox: bytes) -> bytes:
    script = INITRD_INIT.replace("MODULES", " ".join(Path(m).name for m in MODULES))
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""),
        ("dev", 0o40755, b""),
        ("lib", 0o40755, b""),
        ("lib/modules", 0o40755, b""),
        ("bin/busybox", 0o100755, busybox),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, script.encode()),
    ]
    for m in MODULES:
        ko = modules / (m + ".ko")
        if not ko.is_file():
            raise GuestUnavailable(f"the kernel package has no {m}.ko")
        entries.append((f"lib/modules/{Path(m).name}.ko", 0o100644, ko.read_bytes()))
    return gzip.compress(_cpio(entries), 9, mtime=0)


def _rootfs(tree: Path, busybox: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "data", "tmp"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    for applet in _run([str(busybox), "--list"]).split():
        if applet != "busybox" and not (tree / "bin" / applet).exists():
            (tree / "bin" / applet).symlink_to("busybox")
    init = tree / "sbin" / "init"
    init.write_text(GUEST_INIT)
    init.chmod(0o755)
    (tree / "data" / "set.tar").write_bytes(_dataset())
    (tree / "data" / "big.bin").write_bytes(random.Random(5).randbytes(BIG_FILE))


def _build(target: Path, package: str) -> None:
    busybox = Path(BUSYBOX)
    # A dynamic busybox names its ELF interpreter; the initramfs has no libc for it.
    if not busybox.is_file() or b"/lib64/ld-linux" in busybox.read_bytes()[:4096]:
        raise GuestUnavailable("busybox-static is not installed (apt-get install busybox-static)")
    for tool in ("apt-get", "dpkg-deb", "mke2fs"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} is not installed")
    work = target / "work"
    work.mkdir()
    _run(["apt-get", "download", package], cwd=work)
    debs = list(work.glob("*.deb"))
    if len(debs) != 1:
        raise GuestUnavailable(f"apt-get download {package} gave no single .deb")
    unpacked = work / "x"
    _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestUnavailable(f"{package} holds no /boot/vmlinuz-*")
    version = kernels[0].name.removeprefix("vmlinuz-")
    modules = unpacked / "lib" / "modules" / version / "kernel"
    shutil.copyfile(kernels[0], target / "vmlinuz")
    (target / "initrd.gz").write_bytes(_initrd(modules, busybox.read_bytes()))
    tree = work / "root"
    _rootfs(tree, busybox)
    _run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-L", "vmlroot", "-d", str(tree),
            "-E", "lazy_itable_init=0,lazy_journal_init=0",
            str(target / "root.img"), str(ROOT_SIZE // 1024) + "k",
        ]
    )  # fmt: skip
    (target / "info.json").write_text(json.dumps({"kernel_version": version, "package": package}))
    shutil.rmtree(work)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two test workers build it once
        yield


def build_guest(force: bool = False) -> Guest:
    """Build the guest (or reuse the cached build) and return where it is."""
    if sys.platform != "linux":
        raise GuestUnavailable("the guest is built on Debian/Linux only")
    package = kernel_package()
    root = cache_root()
    target = root / _cache_key(package)
    with _locked(root):
        t0 = time.monotonic()
        if force and target.exists():
            shutil.rmtree(target)
        if not (target / "info.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
            try:
                _build(tmp, package)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        seconds = time.monotonic() - t0
    info = json.loads((target / "info.json").read_text())
    return Guest(
        folder=target,
        kernel=target / "vmlinuz",
        initrd=target / "initrd.gz",
        root=target / "root.img",
        kernel_version=str(info["kernel_version"]),
        build_seconds=seconds,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: build the guest and print its files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="build again even if cached")
    args = parser.parse_args(argv)
    try:
        g = build_guest(args.force)
    except GuestUnavailable as e:
        print(f"cannot build the guest: {e}", file=sys.stderr)
        return 1
    print(f"kernel  {g.kernel} ({g.kernel_version})")
    print(f"initrd  {g.initrd} ({g.initrd.stat().st_size} bytes)")
    print(f"root    {g.root}")
    print(f"append  {g.append()}")
    print(f"built in {g.build_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
