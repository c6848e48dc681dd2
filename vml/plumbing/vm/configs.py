"""VM configuration files: VMware ``.vmx``, VirtualBox ``.vbox``, libvirt domain XML.

Each parser reads one small text file and returns a ``Config`` with paths
exactly as written (possibly relative to the config's folder, possibly
absolute).  Parsers return ``None`` for a file that is not what they expect;
they never raise on bad input, because an area may hold half-written or
foreign files and describing the VM must still work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where XML is parsed: a VM without XML does not pay for it
    import xml.etree.ElementTree as ET

#: Config files are small; anything bigger is not one and is not read whole.
MAX_CONFIG = 4 * 1024 * 1024

VBOX_NS = "{http://www.virtualbox.org/}"

_VMX_LINE = re.compile(r'^\s*([^=#\s][^=]*?)\s*=\s*"(.*)"\s*$')
_VMX_ESCAPE = re.compile(r"\|([0-9A-Fa-f]{2})")
_VMX_DISK_KEY = re.compile(r"^(?:scsi|ide|sata|nvme)\d+:\d+\.filename$")
#: VMware device types whose fileName is not a virtual disk.
_VMX_NOT_DISK = ("cdrom", "atapi", "floppy")

_UNIT_TO_BYTES = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}


@dataclass
class DiskRef:
    """A disk a config attaches: path as written, and what the config says of it."""

    path: str
    backing: str | None = None  # parent image, as written (VirtualBox differencing)
    format: str | None = None  # format the config claims, used if the file is absent


@dataclass
class Config:
    """What a VM configuration file says about the VM."""

    hypervisor: str
    name: str | None = None
    guest_os: str | None = None
    memory_mib: int | None = None
    suspended: bool = False
    disks: list[DiskRef] = field(default_factory=list)
    #: Other files the config needs (nvram, saved state), as written.
    extra_files: list[str] = field(default_factory=list)


def _read_small(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_CONFIG:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def parse_vmx_text(text: str) -> dict[str, str]:
    """Parse ``.vmx`` text into a dict with lower-case keys.

    VMware treats keys case-insensitively and escapes bytes in values as
    ``|XX`` (hex), e.g. ``|22`` for a double quote; both are undone here.
    The last assignment of a key wins, as in VMware.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = _VMX_LINE.match(line)
        if not m:
            continue
        value = _VMX_ESCAPE.sub(lambda e: chr(int(e.group(1), 16)), m.group(2))
        values[m.group(1).strip().lower()] = value
    return values


def parse_vmx(path: Path) -> Config | None:
    """Describe a VMware VM from its ``.vmx`` file."""
    text = _read_small(path)
    if text is None:
        return None
    v = parse_vmx_text(text)
    cfg = Config("vmware", v.get("displayname"), v.get("guestos"), _int_or_none(v.get("memsize")))
    for key in sorted(v):
        if not _VMX_DISK_KEY.match(key):
            continue
        device = key.rsplit(".", 1)[0]
        if v.get(device + ".present", "TRUE").upper() == "FALSE":
            continue
        dtype = v.get(device + ".devicetype", "").lower()
        filename = v[key]
        if any(t in dtype for t in _VMX_NOT_DISK) or not filename.lower().endswith(".vmdk"):
            continue
        cfg.disks.append(DiskRef(filename))
    if v.get("nvram"):
        cfg.extra_files.append(v["nvram"])
    state = v.get("checkpoint.vmstate", "")
    if state:
        cfg.suspended = True
        cfg.extra_files.append(state)
    return cfg


def parse_xml(path: Path) -> ET.Element | None:
    """Parse a small XML file; ``None`` if unreadable, malformed or carrying a DTD."""
    text = _read_small(path)
    if text is None:
        return None
    # Refuse DTDs outright: a config never has one, and entity expansion in
    # a hostile file could exhaust memory.
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        return None
    import xml.etree.ElementTree as ET

    try:
        return ET.fromstring(text)
    except ET.ParseError:
        return None


def parse_vbox(path: Path) -> Config | None:
    """Describe a VirtualBox VM from its ``.vbox`` file.

    Media live in ``Machine/MediaRegistry/HardDisks`` (VirtualBox 4.0+);
    a differencing image is a ``HardDisk`` nested inside its parent.  A
    machine-level ``stateFile`` attribute means the VM is saved (suspended).
    """
    root = parse_xml(path)
    if root is None or root.tag != VBOX_NS + "VirtualBox":
        return None
    machine = root.find(VBOX_NS + "Machine")
    if machine is None:
        return None
    cfg = Config("virtualbox", machine.get("name"), machine.get("OSType"))
    memory = machine.find(f"{VBOX_NS}Hardware/{VBOX_NS}Memory")
    if memory is not None:
        cfg.memory_mib = _int_or_none(memory.get("RAMSize"))
    state = machine.get("stateFile")
    if state:
        cfg.suspended = True
        cfg.extra_files.append(state)

    def walk(elem: ET.Element, parent: str | None) -> None:
        for hd in elem.findall(VBOX_NS + "HardDisk"):
            location = hd.get("location")
            if location:
                fmt = hd.get("format")
                cfg.disks.append(DiskRef(location, parent, fmt.lower() if fmt else None))
            walk(hd, location or parent)

    for disks in machine.iter(VBOX_NS + "HardDisks"):
        walk(disks, None)
    return cfg


def memory_to_mib(amount: str | None, unit: str | None) -> int | None:
    """Convert a libvirt ``<memory unit=...>`` value to MiB (default unit KiB)."""
    value = _int_or_none(amount)
    factor = _UNIT_TO_BYTES.get((unit or "KiB").lower())
    if value is None or factor is None:
        return None
    return value * factor // (1024 * 1024)


def parse_libvirt(path: Path) -> Config | None:
    """Describe a VM from a libvirt domain XML (``virsh dumpxml`` output)."""
    root = parse_xml(path)
    if root is None or root.tag != "domain":
        return None
    name = root.findtext("name")
    cfg = Config("qemu", name.strip() if name else None)
    memory = root.find("memory")
    if memory is not None:
        cfg.memory_mib = memory_to_mib(memory.text, memory.get("unit"))
    # Prefer the libosinfo id (e.g. "http://ubuntu.com/ubuntu/22.04"): it
    # names the guest; <os><type> only says "hvm".
    for elem in root.iter():
        if elem.tag.endswith("}os") and elem.get("id"):
            cfg.guest_os = elem.get("id")
            break
    else:
        os_type = root.findtext("os/type")
        cfg.guest_os = os_type.strip() if os_type else None
    for disk in root.findall("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        source = disk.find("source")
        if source is None:
            continue
        target = source.get("file") or source.get("dev")
        if not target:
            continue
        driver = disk.find("driver")
        fmt = driver.get("type") if driver is not None else None
        backing = disk.find("backingStore/source")
        cfg.disks.append(DiskRef(target, backing.get("file") if backing is not None else None, fmt))
    nvram = root.findtext("os/nvram")
    if nvram and nvram.strip():
        cfg.extra_files.append(nvram.strip())
    return cfg
