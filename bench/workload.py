"""Make a VMware-style working area and simulate work sessions in it.

The data is written by the real tools a VM would see, so that every peer
(and VML) is measured on realistic bytes rather than synthetic patterns:

* the disk is a monolithicSparse VMDK made by ``qemu-img convert`` and later
  written by ``qemu-io`` (new grains are appended at the end of the file, as
  VMware does), holding an ext4 filesystem that ``mke2fs -d`` built from real
  files on this machine plus experiment data (half real bytes, half random);
* a ``.vmx`` descriptor, a ``.nvram`` and a ``.vmem`` memory image.

A session writes real file bytes and random bytes at random 64 KiB-aligned
guest offsets, rewrites scattered 4 KiB journal blocks in the first 2% of the
disk, edits the ``.vmx`` and rewrites a quarter of the memory pages.

Everything is driven by :class:`random.Random` with a fixed seed, so two runs
on the same machine build byte-identical areas and sessions. The "real bytes"
come from the machine's own libraries and Python sources, so the workload is
identical between runs on one machine, not between different machines.

The approach follows the project's reference script (``shared/vmwork.py``);
it is copied here on purpose so that the benchmark does not depend on files
outside the repository.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

NAME = "physics-vm"
"""Base name of every file in the area (``NAME.vmdk``, ``NAME.vmx`` ...)."""

MIB = 1 << 20

VML_DIR = ".vml"
"""VML's own bookkeeping inside an area (block cache, area state): not VM data.

Byte comparisons skip it and the peers are told to exclude it, so they
neither pay for saving VML's files nor fail a restore because of them.
"""

# Where the "system" part of the filesystem comes from: text and docs, which
# compress and deduplicate differently from the experiment data.
SYSTEM_TREES = ("/usr/share/perl", "/usr/share/doc", "/usr/lib/python3.11")


@dataclass(frozen=True)
class WorkloadSpec:
    """Sizes of the area and of each session; all sizes in MiB."""

    disk_mib: int = 2048
    fill_mib: int = 512
    vmem_mib: int = 256
    change_mib: int = 16
    seed: int = 1


@cache
def _sources() -> tuple[str, ...]:
    """Real files whose bytes fill the disk and memory (sorted: deterministic)."""
    paths = glob.glob("/usr/lib/x86_64-linux-gnu/*.so*") + glob.glob(
        "/usr/lib/python3*/**/*.py", recursive=True
    )
    files = sorted(p for p in paths if os.path.isfile(p) and os.path.getsize(p) > 0)
    if not files:
        raise RuntimeError("no source files found under /usr/lib to build the workload from")
    return tuple(files)


def real_bytes(rng: random.Random, n: int) -> bytes:
    """Return ``n`` bytes cut from real files on this machine (binaries, text)."""
    out = bytearray()
    sources = _sources()
    while len(out) < n:
        path = rng.choice(sources)
        try:
            with open(path, "rb") as f:
                out += f.read(n - len(out))
        except OSError:
            # An unreadable file only shifts the choice; the rng still
            # advances identically on the same machine.
            pass
    return bytes(out)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def vmx_text(step: int, vmem_mib: int) -> str:
    """Return the ``.vmx`` descriptor of the VM after session ``step``."""
    return (
        '.encoding = "UTF-8"\nconfig.version = "8"\nvirtualHW.version = "4"\n'
        f'displayName = "{NAME}"\nguestOS = "other26xlinux"\nmemsize = "{vmem_mib}"\n'
        f'ide0:0.present = "TRUE"\nide0:0.fileName = "{NAME}.vmdk"\n'
        f'nvram = "{NAME}.nvram"\nchecksum.session = "{step}"\n'
    )


def _copy_system_files(dest: Path, budget: int) -> int:
    """Copy real system files into ``dest`` until ``budget`` bytes; return bytes copied.

    The budget keeps the tiny smoke disk from overflowing: the reference
    script copies a whole tree, which does not fit in a 64 MiB disk.
    """
    copied = 0
    for tree in SYSTEM_TREES:
        if not os.path.isdir(tree):
            continue
        for root, dirs, files in os.walk(tree):
            dirs.sort()
            for name in sorted(files):
                src = os.path.join(root, name)
                if os.path.islink(src) or not os.path.isfile(src):
                    continue
                size = os.path.getsize(src)
                if copied + size > budget:
                    return copied
                rel = os.path.relpath(src, "/")
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                copied += size
    return copied


def make_area(area: Path, spec: WorkloadSpec) -> None:
    """Create the working area: VMDK with ext4 of real files, .vmx, .nvram, .vmem."""
    rng = random.Random(spec.seed)
    area.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=area.parent) as tmp:
        fill = Path(tmp) / "root"
        (fill / "data").mkdir(parents=True)
        # One eighth system files (text, docs), the rest experiment data.
        left = spec.fill_mib * MIB - _copy_system_files(fill / "system", spec.fill_mib * MIB // 8)
        i = 0
        while left > 0:
            n = min(left, 32 * MIB)
            # Half real bytes (compressible, partly duplicated), half random.
            blob = real_bytes(rng, n) if i % 2 == 0 else rng.randbytes(n)
            (fill / "data" / f"run{i:03d}.dat").write_bytes(blob)
            left -= n
            i += 1
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(spec.disk_mib * MIB)
        _run("mke2fs", "-q", "-F", "-t", "ext4", "-d", str(fill), str(raw))
        _run(
            "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
            str(raw), str(area / f"{NAME}.vmdk"),
        )  # fmt: skip
    (area / f"{NAME}.vmx").write_text(vmx_text(0, spec.vmem_mib))
    (area / f"{NAME}.nvram").write_bytes(rng.randbytes(8192))
    if spec.vmem_mib:
        # Memory: one quarter zero pages, the rest real and random bytes.
        with open(area / f"{NAME}.vmem", "wb") as f:
            for j in range(spec.vmem_mib):
                k = j % 4
                if k == 0:
                    f.write(bytes(MIB))
                elif k < 3:
                    f.write(real_bytes(rng, MIB))
                else:
                    f.write(rng.randbytes(MIB))


def _virtual_size(disk: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(disk)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(out)["virtual-size"])


def run_session(area: Path, step: int, spec: WorkloadSpec) -> None:
    """Simulate work session ``step`` (1-based) in the area."""
    # A per-step seed: session k is the same whatever ran before it.
    rng = random.Random(spec.seed * 1000 + step)
    disk = area / f"{NAME}.vmdk"
    size = _virtual_size(disk)
    cmds: list[str] = []
    with tempfile.TemporaryDirectory(dir=area.parent) as tmp:
        # New and rewritten files: real bytes at random 64 KiB-aligned offsets.
        left = spec.change_mib * MIB
        k = 0
        while left > 0:
            n = min(left, rng.choice([256 << 10, 1 * MIB, 4 * MIB]))
            src = os.path.join(tmp, f"w{k}")
            with open(src, "wb") as f:
                f.write(real_bytes(rng, n) if rng.random() < 0.6 else rng.randbytes(n))
            off = rng.randrange(0, (size - n) >> 16) << 16
            cmds += ["-c", f"write -q -s {src} {off} {n}"]
            left -= n
            k += 1
        # Journal and metadata churn: 4 KiB writes in the first 2% of the disk.
        for _ in range(64):
            off = rng.randrange(0, (size // 50) >> 12) << 12
            cmds += ["-c", f"write -q -P {rng.randrange(256)} {off} 4096"]
        _run("qemu-io", "-f", "vmdk", *cmds, str(disk))
    vmx = area / f"{NAME}.vmx"
    memsize = int(vmx.read_text().split('memsize = "')[1].split('"')[0])
    vmx.write_text(vmx_text(step, memsize))
    vmem = area / f"{NAME}.vmem"
    if vmem.exists():
        # A quarter of the memory pages change between two suspends.
        npages = vmem.stat().st_size >> 12
        with open(vmem, "r+b") as f:
            for _ in range(npages // 4 // 64):
                f.seek(rng.randrange(0, npages - 64) << 12)
                f.write(real_bytes(rng, 64 << 12) if rng.random() < 0.7 else bytes(64 << 12))


def hash_area(area: Path) -> dict[str, str]:
    """Return ``{relative path: sha256}`` of every VM file under ``area`` (not ``.vml/``)."""
    hashes: dict[str, str] = {}
    for root, dirs, files in os.walk(area):
        if Path(root) == area and VML_DIR in dirs:
            dirs.remove(VML_DIR)
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(4 * MIB):
                    h.update(chunk)
            hashes[str(path.relative_to(area))] = h.hexdigest()
    return hashes


def find_area_root(dest: Path) -> Path | None:
    """Return the directory under ``dest`` that holds the restored ``.vmx``.

    Peers store paths differently (restic keeps absolute paths, bup and borg
    keep what they were given); looking for the descriptor makes the byte
    comparison independent of that.
    """
    for root, dirs, files in os.walk(dest):
        dirs.sort()
        if f"{NAME}.vmx" in files:
            return Path(root)
    return None
