"""``vml vm init``: write the area's QEMU VM description, so nobody writes one by hand.

Disks must be inside the area (their paths are kept relative to it, so the
area can be checked out anywhere).  A kernel or initrd given from outside
the area is copied in (they are small, and an entry must hold what the VM
boots from); ``copy_boot=False`` refuses them instead.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import AreaError, UsageError
from vml.plumbing.repository import undo_made
from vml.plumbing.vm.description import (
    DISK_FORMATS,
    INTERFACES,
    SUFFIX,
    QemuDisk,
    QemuSpec,
    check_stem,
    find_spec,
    spec_from_json,
    write_spec,
)
from vml.plumbing.vm.formats import read_disk
from vml.records import Record
from vml.values import parse_memory_mib


@dataclass
class VmInitResult(Record):
    """What ``vml vm init`` wrote."""

    area: str
    description: str  # area-relative file name
    spec: QemuSpec
    copied: list[str] = field(default_factory=list)  # boot files copied into the area

    # The description file holds the whole spec; the JSON form names the essentials.
    json_omit = ("spec",)
    json_extra = ("name", "memory_mib", "cpus", "disks")

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.spec.name

    @property
    def memory_mib(self) -> int:
        """Its memory."""
        return self.spec.memory_mib

    @property
    def cpus(self) -> int:
        """Its virtual CPUs."""
        return self.spec.cpus

    @property
    def disks(self) -> list[str]:
        """Its disk images, area-relative."""
        return [d.path for d in self.spec.disks]


def _inside(area: Path, given: Path, what: str) -> str | None:
    """``given`` as an area-relative path, or None if it lies outside the area."""
    real_area = os.path.realpath(area)
    full = os.path.realpath(given if given.is_absolute() else Path.cwd() / given)
    if not os.path.isfile(full):
        raise AreaError(f"{what} {given} does not exist", "give the path of an existing file")
    if full.startswith(real_area.rstrip(os.sep) + os.sep):
        return Path(os.path.relpath(full, real_area)).as_posix()
    return None


def _disk(area: Path, given: Path, interface: str) -> QemuDisk:
    if interface not in INTERFACES:
        raise UsageError(f"unknown disk interface {interface!r}", f"use one of {INTERFACES}")
    rel = _inside(area, given, "disk")
    if rel is None:
        raise AreaError(
            f"disk {given} is outside the area {area}",
            "move or copy it into the area first (entries hold what is in the area)",
        )
    raw = read_disk(area / rel)
    fmt = raw.format if raw is not None else "raw"
    if fmt not in DISK_FORMATS:
        raise AreaError(
            f"disk {rel} is {fmt}; vml run takes raw or qcow2",
            f"convert it (qemu-img convert -O qcow2 {rel} disk.qcow2)",
        )
    return QemuDisk(rel, fmt, interface)


def _boot_file(
    area: Path, given: Path | None, what: str, copy: bool, copied: list[str]
) -> str | None:
    if given is None:
        return None
    rel = _inside(area, given, what)
    if rel is not None:
        return rel
    if not copy:
        raise AreaError(
            f"{what} {given} is outside the area", "copy it into the area, or drop --no-copy"
        )
    name = given.name
    # lexists: a link there, even one whose target is not there yet, is the
    # user's (a copy would write through it, an undo would remove it).
    if os.path.lexists(area / name):
        raise AreaError(
            f"cannot copy {what} {given} into the area: {name} exists there",
            "copy it in under another name and give that path",
        )
    copied.append(name)  # before the copy: one cut short is removed too
    shutil.copyfile(given, area / name)
    return name


def memory_mib(text: str) -> int:
    """``--memory``: ``256M``, ``1G``, or a plain number of MiB (see ``vml.values``)."""
    return parse_memory_mib(text)


def vm_init(
    area: Path,
    *,
    disks: Sequence[Path],
    memory: str | int = "1G",
    cpus: int = 1,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    qemu_args: Sequence[str] = (),
    name: str | None = None,
    machine: str = "q35",
    network: str = "user",
    display: str = "none",
    interface: str = "virtio",
    copy_boot: bool = True,
    force: bool = False,
) -> VmInitResult:
    """Write ``<name>.qemu.json`` in ``area``; see the module doc."""
    if not area.is_dir():
        raise AreaError(f"no working area at {area}", "create the folder and put the disks in it")
    if not disks:
        raise UsageError("a VM needs at least one disk", "pass --disk FILE")
    if (initrd is not None or append is not None) and kernel is None:
        raise UsageError("--initrd and --append go with --kernel", "add --kernel FILE")
    if cpus < 1:
        raise UsageError("--cpus must be at least 1", "")
    try:
        existing = find_spec(area)
    except AreaError:
        existing = None
    if existing is not None and not force:
        raise AreaError(
            f"the area {area} has a VM description already ({existing.source})",
            "pass --force to write a new one",
        )
    stem = check_stem(
        name or re.sub(r"[^A-Za-z0-9._-]", "_", area.resolve().name).lstrip("._-") or "vm"
    )
    parsed = [_disk(area, Path(d), interface) for d in disks]
    copied: list[str] = []
    doc: dict[str, object] = {
        "vml_qemu": 1,
        "name": name or stem,
        "machine": machine,
        "memory_mib": memory if isinstance(memory, int) else memory_mib(memory),
        "cpus": cpus,
        "disks": [{"path": d.path, "format": d.format, "interface": d.interface} for d in parsed],
        "network": network,
        "display": display,
        "qemu_args": list(qemu_args),
    }
    # Checked before boot files are copied into the area.
    try:
        spec_from_json(doc, stem, stem + SUFFIX)
    except AreaError as e:
        raise UsageError(
            e.message.split(": ", 1)[-1],
            "see `vml vm init --help` for what each option takes",
        ) from None
    try:
        kernel_rel = _boot_file(area, kernel, "kernel", copy_boot, copied)
        initrd_rel = _boot_file(area, initrd, "initrd", copy_boot, copied)
        for key, value in (("kernel", kernel_rel), ("initrd", initrd_rel), ("append", append)):
            if value is not None:
                doc[key] = value
        spec = spec_from_json(doc, stem, stem + SUFFIX)
        path = write_spec(area, spec)
    except BaseException:
        # A rerun would find its own copies in the way ("exists there").
        undo_made(area, copied)
        raise
    # The description it replaces goes once the new one is there.
    if (
        existing is not None
        and existing.source != spec.stem + SUFFIX
        and existing.source.endswith(SUFFIX)
    ):
        (area / existing.source).unlink(missing_ok=True)
    return VmInitResult(str(area), path.name, spec, copied)
