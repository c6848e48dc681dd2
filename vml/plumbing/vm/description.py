"""The description of a QEMU VM that VML runs: ``<name>.qemu.json`` in the area.

One small JSON file says what ``vml run`` starts (``docs/VMS.md``,
``docs/FORMAT.md``)::

    {"vml_qemu": 1, "name": "analysis", "arch": "x86_64", "machine": "q35",
     "memory_mib": 256, "cpus": 1,
     "disks": [{"path": "root.img", "format": "raw", "interface": "virtio"}],
     "kernel": "vmlinuz", "initrd": "initrd.gz", "append": "console=ttyS0",
     "network": "user", "display": "none", "qemu_args": []}

Paths are relative to the area (``/``-separated, never leaving it), so the
area can be checked out anywhere.  The file's stem names the VM's runtime
files: ``<stem>.ram`` holds its memory while it runs, ``<stem>.vmstate`` its
saved device state.  A libvirt domain XML in the area is read into the same
shape (``from_libvirt``) where what it says can be honoured.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from vml.errors import AreaError
from vml.plumbing.vm.configs import Config, DiskRef, memory_to_mib, parse_xml
from vml.plumbing.vm.durable import write_durably

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

SUFFIX = ".qemu.json"
FORMAT_VERSION = 1
RAM_SUFFIX = ".ram"
STATE_SUFFIX = ".vmstate"
ARCHES = ("x86_64", "i386", "aarch64")
INTERFACES = ("virtio", "ide", "scsi", "nvme")
DISK_FORMATS = ("raw", "qcow2")
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DISPLAY = re.compile(r"^(none|gtk|sdl|vnc=[^,\s]+)$")
_NETWORK = ("none", "user")


def _bad(where: str, what: str) -> AreaError:
    return AreaError(
        f"the VM description {where} is malformed: {what}",
        "fix it, or write it again with `vml vm init --force`",
    )


@dataclass(frozen=True)
class QemuDisk:
    """One disk: an image in the area, its format and how the guest sees it."""

    path: str
    format: str = "raw"
    interface: str = "virtio"


@dataclass(frozen=True)
class QemuSpec:
    """What ``vml run`` starts.  ``stem`` names the runtime files; see the module doc."""

    stem: str
    name: str
    memory_mib: int
    cpus: int = 1
    arch: str = "x86_64"
    machine: str = "q35"
    disks: tuple[QemuDisk, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    network: str = "user"
    display: str = "none"
    qemu_args: tuple[str, ...] = ()
    source: str = ""  # area-relative file it was read from
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def ram_file(self) -> str:
        """Area-relative name of the memory file."""
        return self.stem + RAM_SUFFIX

    @property
    def state_file(self) -> str:
        """Area-relative name of the saved device state."""
        return self.stem + STATE_SUFFIX

    def files(self) -> list[str]:
        """Every area file the VM boots from (disks, kernel, initrd)."""
        out = [d.path for d in self.disks]
        out += [p for p in (self.kernel, self.initrd) if p]
        return out

    def to_json(self) -> dict[str, object]:
        """The description file's content."""
        doc: dict[str, object] = {
            "vml_qemu": FORMAT_VERSION,
            "name": self.name,
            "arch": self.arch,
            "machine": self.machine,
            "memory_mib": self.memory_mib,
            "cpus": self.cpus,
            "disks": [
                {"path": d.path, "format": d.format, "interface": d.interface} for d in self.disks
            ],
        }
        for key in ("kernel", "initrd", "append"):
            value = getattr(self, key)
            if value is not None:
                doc[key] = value
        doc["network"] = self.network
        doc["display"] = self.display
        doc["qemu_args"] = list(self.qemu_args)
        return doc


def check_relative(path: str, what: str) -> str:
    """``path`` as a clean area-relative posix path, or ``AreaError`` if it leaves the area."""
    p = PurePosixPath(path.replace(os.sep, "/"))
    if p.is_absolute() or not p.parts or ".." in p.parts or p.parts[0] == ".vml":
        raise AreaError(
            f"{what} {path!r} is not a path inside the area",
            "name files inside the area, relative to it",
        )
    return p.as_posix()


def _opt_str(doc: dict[str, object], key: str, where: str) -> str | None:
    v = doc.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(where, f"{key} is not a string")
    return v


def _int(doc: dict[str, object], key: str, where: str, default: int | None = None) -> int:
    v = doc.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _bad(where, f"{key} is not a positive integer")
    return v


def spec_from_json(doc: object, stem: str, where: str) -> QemuSpec:
    """Check and read a description document; ``AreaError`` naming what is wrong."""
    if not isinstance(doc, dict) or doc.get("vml_qemu") != FORMAT_VERSION:
        raise _bad(where, f"not a version {FORMAT_VERSION} VML QEMU description")
    disks = doc.get("disks", [])
    if not isinstance(disks, list):
        raise _bad(where, "disks is not a list")
    parsed = []
    for d in disks:
        if not isinstance(d, dict) or not isinstance(d.get("path"), str):
            raise _bad(where, "a disk has no path")
        fmt, iface = d.get("format", "raw"), d.get("interface", "virtio")
        if fmt not in DISK_FORMATS or iface not in INTERFACES:
            raise _bad(where, f"disk {d['path']}: format {fmt!r} or interface {iface!r}")
        parsed.append(QemuDisk(check_relative(d["path"], "disk"), fmt, iface))
    args = doc.get("qemu_args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise _bad(where, "qemu_args is not a list of strings")
    arch, machine = doc.get("arch", "x86_64"), doc.get("machine", "q35")
    if arch not in ARCHES or not isinstance(machine, str) or not machine:
        raise _bad(where, f"arch {arch!r} or machine {machine!r}")
    network, display = doc.get("network", "user"), doc.get("display", "none")
    if network not in _NETWORK or not isinstance(display, str) or not _DISPLAY.match(display):
        raise _bad(where, f"network {network!r} or display {display!r}")
    name = _opt_str(doc, "name", where) or stem
    kernel, initrd = _opt_str(doc, "kernel", where), _opt_str(doc, "initrd", where)
    return QemuSpec(
        stem=stem,
        name=name,
        memory_mib=_int(doc, "memory_mib", where),
        cpus=_int(doc, "cpus", where, 1),
        arch=arch,
        machine=machine,
        disks=tuple(parsed),
        kernel=check_relative(kernel, "kernel") if kernel else None,
        initrd=check_relative(initrd, "initrd") if initrd else None,
        append=_opt_str(doc, "append", where),
        network=str(network),
        display=display,
        qemu_args=tuple(args),
        source=where,
    )


def stem_of(filename: str) -> str | None:
    """The stem of a description file name, or None if it is not one."""
    if not filename.endswith(SUFFIX):
        return None
    stem = filename[: -len(SUFFIX)]
    return stem if _STEM.match(stem) else None


def check_stem(stem: str) -> str:
    """``stem`` if it can name a VM's files, else ``AreaError``."""
    if not _STEM.match(stem):
        raise AreaError(
            f"{stem!r} cannot name a VM", "use letters, digits, '.', '_' and '-' (up to 64)"
        )
    return stem


def read_spec(area: Path, rel: str) -> QemuSpec:
    """Read the description ``rel`` of ``area``."""
    stem = stem_of(PurePosixPath(rel).name)
    if stem is None:
        raise _bad(rel, f"its name does not end in {SUFFIX}")
    path = area / rel
    try:
        if path.stat().st_size > 1 << 20:
            raise _bad(rel, "it is bigger than 1 MiB")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _bad(rel, str(e)) from None
    return spec_from_json(doc, stem, rel)


def write_spec(area: Path, spec: QemuSpec) -> Path:
    """Write ``spec`` as ``<stem>.qemu.json`` in ``area`` (atomically, durably); returns its path."""
    path = area / (spec.stem + SUFFIX)
    write_durably(path, (json.dumps(spec.to_json(), indent=1) + "\n").encode())
    return path


def parse_qemu_json(path: Path) -> Config | None:
    """Describe a VM from its ``<name>.qemu.json`` (the ``inspect`` config parser).

    A ``<stem>.vmstate`` next to it means the VM was saved running (like a
    suspended VMware VM); its memory file is then part of that state.
    """
    stem = stem_of(path.name)
    if stem is None:
        return None
    try:
        if path.stat().st_size > 1 << 20:
            return None
        spec = spec_from_json(json.loads(path.read_text(encoding="utf-8")), stem, path.name)
    except (OSError, ValueError, AreaError):
        return None
    cfg = Config("qemu", spec.name, None, spec.memory_mib)
    cfg.disks = [DiskRef(d.path, None, d.format) for d in spec.disks]
    cfg.extra_files = [p for p in (spec.kernel, spec.initrd) if p]
    if (path.parent / spec.state_file).exists():
        cfg.suspended = True
        cfg.extra_files += [spec.state_file, spec.ram_file]
    return cfg


# --- libvirt domain XML -------------------------------------------------------

_BUS = {"virtio": "virtio", "ide": "ide", "sata": "ide", "scsi": "scsi", "nvme": "nvme"}


def _libvirt_disks(
    root: ET.Element, place: Callable[[str], str], problems: list[str]
) -> list[QemuDisk]:
    """The file disks of a domain, placed in the area; what cannot be honoured goes to ``problems``."""
    disks: list[QemuDisk] = []
    for disk in root.findall("devices/disk"):
        device = disk.get("device", "disk")
        if device != "disk":
            problems.append(f"a {device} device")
            continue
        source = disk.find("source")
        written = source.get("file") if source is not None else None
        if disk.get("type", "file") != "file" or not written:
            problems.append("a disk that is not a file")
            continue
        driver, target = disk.find("driver"), disk.find("target")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        bus = _BUS.get((target.get("bus") if target is not None else None) or "virtio")
        if fmt not in DISK_FORMATS or bus is None:
            problems.append(f"disk {written} ({fmt})")
            continue
        disks.append(QemuDisk(place(written), fmt, bus))
    return disks


def from_libvirt(area: Path, rel: str) -> QemuSpec:
    """Read a libvirt domain XML of ``area`` as a description, where it can be honoured.

    Used: ``name``, ``memory``, ``vcpu``, ``os/type@arch`` and ``@machine``,
    ``os/kernel``, ``initrd``, ``cmdline``, file disks (``driver@type`` raw or
    qcow2, ``target@bus``).  Disks must be in the area (absolute paths that
    lead into it are fine).  Anything else that changes what the guest sees
    (other disk kinds, UEFI ``loader``, host devices) is refused, naming it.
    """
    root = parse_xml(area / rel)
    if root is None or root.tag != "domain":
        raise _bad(rel, "not a libvirt domain XML")
    real_area = os.path.realpath(area)

    def inside(written: str, what: str) -> str:
        """``written`` as an area-relative path; ``AreaError`` if it lies outside."""
        full = os.path.realpath(os.path.join(area, os.path.dirname(rel), written))
        if not (full == real_area or full.startswith(real_area.rstrip(os.sep) + os.sep)):
            raise AreaError(
                f"{rel}: {what} {written} is outside the area; vml run cannot honour it",
                "move it into the area and point the XML at it, or use `vml vm init`",
            )
        return Path(os.path.relpath(full, real_area)).as_posix()

    problems = [e.tag for e in root.findall("devices/*") if e.tag in ("hostdev", "filesystem")]
    if root.find("os/loader") is not None:
        problems.append("os/loader (UEFI)")
    disks = _libvirt_disks(root, lambda written: inside(written, "disk"), problems)
    if problems:
        raise AreaError(
            f"{rel}: vml run cannot honour {', '.join(problems)}",
            "run this domain with virsh, or describe the VM with `vml vm init`",
        )
    memory = root.find("memory")
    mib = memory_to_mib(memory.text, memory.get("unit")) if memory is not None else None
    os_type = root.find("os/type")
    arch = (os_type.get("arch") if os_type is not None else None) or "x86_64"
    machine = (os_type.get("machine") if os_type is not None else None) or "q35"
    files = {
        key: inside(text.strip(), key)
        for key in ("kernel", "initrd")
        if (text := root.findtext(f"os/{key}"))
    }
    name = (root.findtext("name") or "").strip()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or PurePosixPath(rel).stem
    cmdline = root.findtext("os/cmdline")
    try:
        cpus = int(root.findtext("vcpu") or 1)
    except ValueError:
        cpus = 1
    return QemuSpec(
        stem=check_stem(stem if stem[0].isalnum() else "vm" + stem),
        name=name or stem,
        memory_mib=mib or 512,
        cpus=max(cpus, 1),
        arch=arch if arch in ARCHES else "x86_64",
        machine=machine,
        disks=tuple(disks),
        kernel=files.get("kernel"),
        initrd=files.get("initrd"),
        append=cmdline.strip() if cmdline else None,
        network="user" if root.find("devices/interface") is not None else "none",
        display="none" if root.find("devices/graphics") is None else "vnc=127.0.0.1:0",
        source=rel,
    )


def find_spec(area: Path) -> QemuSpec | None:
    """The area's description: its ``*.qemu.json``, else a libvirt XML at its root.

    ``AreaError`` when there are several ``*.qemu.json`` files or the one
    there is malformed; ``None`` when there is no description at all.
    """
    try:
        names = sorted(os.listdir(area))
    except OSError:
        return None
    ours = [n for n in names if stem_of(n) is not None and (area / n).is_file()]
    if len(ours) > 1:
        raise AreaError(
            f"the area {area} holds several VM descriptions: {', '.join(ours)}",
            "keep one *.qemu.json per area",
        )
    if ours:
        return read_spec(area, ours[0])
    for n in names:
        if n.lower().endswith(".xml") and (area / n).is_file():
            root = parse_xml(area / n)
            if root is not None and root.tag == "domain":
                return from_libvirt(area, n)
    return None
