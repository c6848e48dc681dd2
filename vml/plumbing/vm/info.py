"""What an entry records about its VM: :class:`VMInfo` and its disks, and their JSON form.

Kept apart from ``inspect`` (which reads them from an area) so that reading
them back from an entry (``vml log``, ``vml show``) loads none of the
config parsers, disk formats and running checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from vml.errors import CorruptRepository


@dataclass(frozen=True)
class DiskInfo:
    """One virtual disk of the VM.

    ``path`` is the image (or VMDK descriptor) relative to the area; ``files``
    is every file inside the area the disk needs (the image itself plus its
    extents, e.g. ``-flat.vmdk`` or ``-s001.vmdk``), and ``external`` the
    absolute paths of extents and backing files outside the area.  A backing
    file inside the area is a disk of its own and named by ``backing``.
    """

    path: str
    format: str
    virtual_size: int | None
    files: tuple[str, ...]
    external: tuple[str, ...]
    backing: str | None

    def to_json(self) -> dict[str, object]:
        """Return a JSON-ready dict of this disk."""
        return {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "files": list(self.files),
            "external": list(self.external),
            "backing": self.backing,
        }

    @classmethod
    def from_json(cls, d: object) -> DiskInfo:
        """Rebuild a disk from ``to_json`` output; raise ``CorruptRepository`` if malformed."""
        m = _mapping(d, "disk")
        return cls(
            path=_str(m, "path"),
            format=_str(m, "format"),
            virtual_size=_opt_int(m, "virtual_size"),
            files=_strs(m, "files"),
            external=_strs(m, "external"),
            backing=_opt_str(m, "backing"),
        )


@dataclass(frozen=True)
class VMInfo:
    """What VML knows about the VM in an area.

    ``hypervisor`` is ``"none"`` for an empty or unrecognised area.
    ``config_external`` lists files the configuration needs that live outside
    the area (e.g. a libvirt NVRAM file), as absolute paths.
    """

    hypervisor: str
    name: str | None
    guest_os: str | None
    memory_mib: int | None
    power_state: str
    config: str | None
    disks: tuple[DiskInfo, ...]
    config_external: tuple[str, ...] = ()

    @property
    def external(self) -> tuple[str, ...]:
        """Every file outside the area the VM needs, sorted, without duplicates."""
        found = set(self.config_external)
        for disk in self.disks:
            found.update(disk.external)
        return tuple(sorted(found))

    def to_json(self) -> dict[str, object]:
        """Return a JSON-ready dict (stored with each entry)."""
        return {
            "hypervisor": self.hypervisor,
            "name": self.name,
            "guest_os": self.guest_os,
            "memory_mib": self.memory_mib,
            "power_state": self.power_state,
            "config": self.config,
            "disks": [d.to_json() for d in self.disks],
            "config_external": list(self.config_external),
        }

    @classmethod
    def from_json(cls, d: object) -> VMInfo:
        """Rebuild from ``to_json`` output; raise ``CorruptRepository`` if malformed."""
        m = _mapping(d, "VM description")
        disks = m.get("disks", [])
        if not isinstance(disks, list):
            raise _bad("disks is not a list")
        return cls(
            hypervisor=_str(m, "hypervisor"),
            name=_opt_str(m, "name"),
            guest_os=_opt_str(m, "guest_os"),
            memory_mib=_opt_int(m, "memory_mib"),
            power_state=_str(m, "power_state"),
            config=_opt_str(m, "config"),
            disks=tuple(DiskInfo.from_json(x) for x in disks),
            config_external=_strs(m, "config_external") if "config_external" in m else (),
        )


def _bad(what: str) -> CorruptRepository:
    return CorruptRepository(f"stored VM description is malformed: {what}")


def _mapping(d: object, what: str) -> dict[str, object]:
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise _bad(f"{what} is not an object")
    return d


def _str(m: dict[str, object], key: str) -> str:
    v = m.get(key)
    if not isinstance(v, str):
        raise _bad(f"{key} is not a string")
    return v


def _opt_str(m: dict[str, object], key: str) -> str | None:
    v = m.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(f"{key} is not a string")
    return v


def _opt_int(m: dict[str, object], key: str) -> int | None:
    v = m.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise _bad(f"{key} is not an integer")
    return v


def _strs(m: dict[str, object], key: str) -> tuple[str, ...]:
    v = m.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad(f"{key} is not a list of strings")
    return tuple(v)
