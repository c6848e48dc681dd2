"""Know the VM kept in a working area: which hypervisor, which disks, is it running.

``inspect_area`` describes the VM from its configuration file (``.vmx``,
``.vbox`` or libvirt domain XML) and the headers/descriptors of its disk
images; ``running_reasons`` lists signs that a hypervisor is using it;
``check_saveable`` combines both into the go/no-go check made before saving.
Details of each format are in ``formats`` and ``configs``, of the
running checks in ``locks``; ``docs/VMS.md`` is the user-facing summary.

Paths in results are relative to the area with ``/`` separators, except
files outside the area, which are absolute (and also listed in ``external``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from vml.errors import AreaError, VMRunning
from vml.plumbing.vm.configs import Config, DiskRef, parse_libvirt, parse_vbox, parse_vmx
from vml.plumbing.vm.description import parse_qemu_json
from vml.plumbing.vm.formats import RawDisk, is_candidate, read_disk
from vml.plumbing.vm.ignore import RESUME_SUFFIX, VML_DIR, IgnoreRules
from vml.plumbing.vm.info import DiskInfo, VMInfo
from vml.plumbing.vm.locks import image_reasons, lck_entries
from vml.plumbing.vm.qemu import RunningVM, vml_vm

#: Config suffix → (parser, rank); a lower rank wins when an area holds several.
#: ``.json`` is VML's own QEMU description (``<name>.qemu.json``).
_CONFIG_PARSERS = {
    ".vmx": (parse_vmx, 0),
    ".vbox": (parse_vbox, 1),
    ".json": (parse_qemu_json, 2),
    ".xml": (parse_libvirt, 3),
}
#: Files that hold a VM's memory or device state; checked for writers like disks.
_STATE_SUFFIXES = (".vmem", ".vmss", ".vmsn", ".sav", ".nvram", ".ram", ".vmstate")
#: Files that hold a VM's memory page for page: saved after the disks, so their
#: pages can be stored as references to the disk pages the guest cached.
MEMORY_SUFFIXES = (".vmem", ".vmss", ".vmsn", ".sav", ".ram")


def is_memory(path: str) -> bool:
    """Whether ``path`` names a memory file (saved, and built at checkout, after the disks)."""
    return path.lower().endswith(MEMORY_SUFFIXES)


#: Disk format family → hypervisor, for areas with disks but no config.
_FAMILY = {"vmdk": "vmware", "vdi": "virtualbox"}
_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")


# --- walking the area -------------------------------------------------------


@dataclass
class _Scan:
    """Every entry of an area: files, and folders VML does not descend into."""

    files: list[str] = field(default_factory=list)
    lck_dirs: list[str] = field(default_factory=list)


def _scan(root: Path) -> _Scan:
    """List the area's files (relative, posix), skipping ``.vml`` and ``*.lck`` folders.

    Symlinked folders are not followed: a link could lead anywhere, even back
    into the area.  Unreadable folders are skipped, not fatal.
    """
    scan = _Scan()
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _e: None):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else PurePosixPath(Path(rel_dir)).as_posix() + "/"
        keep = []
        for d in sorted(dirnames):
            if d == VML_DIR:
                continue
            if d.lower().endswith(".lck"):
                scan.lck_dirs.append(prefix + d)
                continue
            keep.append(d)
        dirnames[:] = keep
        scan.files.extend(prefix + f for f in sorted(filenames))
    return scan


class _Resolver:
    """Turn paths written in configs and descriptors into area-relative or absolute paths."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.abspath(root)
        self.real_root = os.path.realpath(root)

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def resolve(self, base_rel: str, written: str) -> tuple[str | None, str]:
        """Resolve ``written`` as seen from the area folder ``base_rel``.

        Returns ``(relative path or None if outside the area, absolute path)``.
        Windows absolute paths and URLs/``json:`` specs cannot be resolved on
        this host; they come back as ``(None, written)``.
        """
        if _WINDOWS_ABS.match(written) or "://" in written or written.startswith("json:"):
            return None, written
        if "\\" in written and "/" not in written:
            written = written.replace("\\", "/")  # descriptor written on Windows
        lexical = os.path.normpath(os.path.join(self.root, base_rel, written))
        real = os.path.realpath(lexical)
        if not self._inside(real):
            return None, real
        rel = os.path.relpath(lexical, self.root)
        if rel == ".." or rel.startswith(".." + os.sep):
            # Written as a path outside, but it leads back in (e.g. through
            # the area's own absolute path or a symlinked parent).
            rel = os.path.relpath(real, self.real_root)
        return Path(rel).as_posix(), real


class _DiskCollector:
    """Describe disks once each, following backing chains inside the area."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.resolver = _Resolver(root)
        self.disks: dict[str, DiskInfo] = {}
        self.order: list[str] = []

    def add(self, base_rel: str, ref: DiskRef, raw: RawDisk | None = None) -> None:
        """Describe the disk ``ref`` written in a file in folder ``base_rel``, then its parents.

        ``raw`` is the disk's header when the caller has read it already.
        """
        rel, absolute = self.resolver.resolve(base_rel, ref.path)
        key = rel if rel is not None else absolute
        if key in self.disks:
            return
        if raw is None and os.path.isfile(absolute):
            raw = read_disk(Path(absolute))
        if raw is None:
            raw = RawDisk(ref.format or "unknown")
        image_dir = os.path.dirname(rel) if rel is not None else os.path.dirname(absolute)
        files: list[str] = [rel] if rel is not None else []
        external: list[str] = [] if rel is not None else [absolute]
        for extent in raw.extents:
            e_rel, e_abs = self.resolver.resolve(image_dir, extent)
            if e_rel is not None:
                files.append(e_rel)
            else:
                external.append(e_abs)
        # The image's own header names its parent relative to the image; a
        # config's (VirtualBox) is relative to the config.
        backing_ref: DiskRef | None = None
        backing_base = image_dir
        if raw.backing:
            backing_ref = DiskRef(raw.backing)
        elif ref.backing:
            backing_ref = DiskRef(ref.backing)
            backing_base = base_rel
        backing: str | None = None
        if backing_ref is not None:
            b_rel, b_abs = self.resolver.resolve(backing_base, backing_ref.path)
            backing = b_rel if b_rel is not None else b_abs
            if b_rel is None:
                external.append(b_abs)
        self.disks[key] = DiskInfo(
            path=key,
            format=raw.format,
            virtual_size=raw.virtual_size,
            files=tuple(dict.fromkeys(files)),
            external=tuple(dict.fromkeys(external)),
            backing=backing,
        )
        self.order.append(key)
        if backing_ref is not None and backing is not None and not os.path.isabs(backing):
            self.add(backing_base, backing_ref)

    def result(self) -> tuple[DiskInfo, ...]:
        """All disks in the order found, minus files that are another disk's extent."""
        claimed: set[str] = set()
        for disk in self.disks.values():
            claimed.update(f for f in disk.files if f != disk.path)
        return tuple(self.disks[k] for k in self.order if k not in claimed)


def _find_config(root: Path, files: Iterable[str]) -> tuple[str, Config] | None:
    """Pick the VM's config: shallowest first, then .vmx before .vbox before XML."""
    candidates = []
    for rel in files:
        suffix = PurePosixPath(rel).suffix.lower()
        if suffix in _CONFIG_PARSERS:
            parser, rank = _CONFIG_PARSERS[suffix]
            candidates.append((rel.count("/"), rank, rel))
    for _depth, rank, rel in sorted(candidates):
        parser = next(p for p, r in _CONFIG_PARSERS.values() if r == rank)
        cfg = parser(root / rel)
        if cfg is not None:
            return rel, cfg
    return None


def _inspect(root: Path, scan: _Scan, running: bool) -> VMInfo:
    rules = IgnoreRules.load(root)
    visible = [f for f in scan.files if not rules.is_ignored(f)]
    found = _find_config(root, visible)
    collector = _DiskCollector(root)
    config_rel: str | None = None
    cfg: Config | None = None
    config_external: list[str] = []
    if found is not None:
        config_rel, cfg = found
        base = os.path.dirname(config_rel)
        for ref in cfg.disks:
            collector.add(base, ref)
        for extra in cfg.extra_files:
            rel, absolute = collector.resolver.resolve(base, extra)
            if rel is None:
                config_external.append(absolute)
    for rel in visible:
        # Probe only files not already described through the config, and
        # hand the header read to the collector: each is read once.
        if is_candidate(rel) and rel not in collector.disks:
            probed = read_disk(root / rel)
            if probed:
                collector.add("", DiskRef(rel), probed)
    disks = collector.result()

    hypervisor = cfg.hypervisor if cfg is not None else "none"
    if cfg is None and disks:
        family = disks[0].format.split("-")[0]
        hypervisor = _FAMILY.get(family, "qemu")
    suspended = cfg.suspended if cfg is not None else False
    if hypervisor == "vmware" and cfg is None:
        suspended = any(f.lower().endswith(".vmss") for f in visible)
    # A running state saved through QMP or libvirt (`vml run` resumes it).
    suspended = suspended or any(f.endswith(RESUME_SUFFIX) and "/" not in f for f in visible)
    power = "running" if running else ("suspended" if suspended else "off")
    return VMInfo(
        hypervisor=hypervisor,
        name=cfg.name if cfg else None,
        guest_os=cfg.guest_os if cfg else None,
        memory_mib=cfg.memory_mib if cfg else None,
        power_state=power,
        config=config_rel,
        disks=disks,
        config_external=tuple(dict.fromkeys(config_external)),
    )


def _running(root: Path, scan: _Scan) -> tuple[list[str], RunningVM | None]:
    """Signs that someone else runs the VM, and the QEMU VML runs for it (if any)."""
    own = vml_vm(root)
    reasons = lck_entries(root, scan.lck_dirs + scan.files)
    watched = [f for f in scan.files if is_candidate(f) or f.lower().endswith(_STATE_SUFFIXES)]
    reasons.extend(image_reasons(root, watched, own.pid if own is not None else None))
    return reasons, own


def inspect_area(root: Path, *, running: bool = True) -> VMInfo:
    """Describe the VM kept in the folder ``root``.

    Reads configuration files and image headers/descriptors only, never image
    data.  Never raises on odd or unreadable files: what cannot be read is
    left ``None``; a missing or empty folder gives ``hypervisor="none"``.
    Files ignored by the area's rules (``.vmlignore`` and defaults) are not
    considered.  ``power_state`` is ``"running"`` when ``running_reasons``
    finds anything.  ``running=False``: for a caller that uses the files'
    description only, the signs of a running VM are not looked for (they
    cost a ``stat`` of every file every process of the host has open) and
    ``power_state`` says what the files say.
    """
    if not root.is_dir():
        return VMInfo("none", None, None, None, "off", None, ())
    scan = _scan(root)
    if not running:
        return _inspect(root, scan, False)
    reasons, own = _running(root, scan)
    return _inspect(root, scan, bool(reasons) or own is not None)


def running_reasons(root: Path) -> list[str]:
    """Human-readable reasons the VM in ``root`` looks running; empty if none.

    Signs: a QEMU that ``vml run`` started for it; VMware ``*.lck``
    folders/files; byte-range locks another process holds on an image
    (qemu's image locking); image or state files another process has open
    for writing (Linux ``/proc``; how VirtualBox shows).  See ``locks`` for
    why each sign means what it does.
    """
    if not root.is_dir():
        return []
    reasons, own = _running(root, _scan(root))
    if own is not None:
        reasons.insert(0, f"it runs under `vml run` (QEMU pid {own.pid})")
    return reasons


OVERLAY_DIR = ".vml/overlays"


def stranded_overlays(root: Path) -> list[str]:
    """Overlays a live save left that no process holds any more (area-relative).

    A save through QMP or libvirt runs the guest on overlays in
    ``.vml/overlays`` and merges them back after; when the VM stopped in
    between, they hold every write the guest made since the pause, which
    the area's images lack.  Empty while a QEMU still runs on them (the
    next save merges them back).
    """
    d = root / OVERLAY_DIR
    try:
        rels = sorted(f"{OVERLAY_DIR}/{p.name}" for p in d.iterdir() if p.is_file())
    except OSError:
        return []
    if not rels or image_reasons(root, rels):
        return []
    return rels


def stranded_error(root: Path, rels: list[str], what: str) -> AreaError:
    """The refusal of ``what`` (a save, a checkout) over stranded overlays."""
    return AreaError(
        f"{root} holds {', '.join(rels)}: the VM's writes after a live save whose QEMU "
        f"stopped before they were merged back, which its images lack; {what} would lose them",
        "if the VM has not run on its images since, merge each into its image "
        "(`qemu-img commit FILE`) and delete it; otherwise delete them; then run the command again",
    )


def check_saveable(
    root: Path, *, force_running: bool, include_external: bool, live: bool = False
) -> VMInfo:
    """Describe the VM in ``root`` and check that it can be saved as it is.

    Raises ``VMRunning`` naming the locks if the VM looks running, unless
    ``force_running``; raises ``AreaError`` naming the files the VM needs
    outside the area, unless ``include_external``.  Returns the description.
    A VM that runs under ``vml run`` (VML's own QEMU, and nobody else using
    its files) is refused too, unless ``live`` (the caller saves it through
    ``live.live_snapshot``) or ``force_running``.
    """
    if not root.is_dir():
        raise AreaError(f"working area {root} is not a folder", "give the folder that holds the VM")
    stranded = stranded_overlays(root)
    if stranded:
        raise stranded_error(root, stranded, "saving the images")
    scan = _scan(root)
    reasons, own = _running(root, scan)
    if reasons and not force_running:
        raise VMRunning(
            f"the VM in {root} looks running"
            + (" (and not only under `vml run`)" if own is not None else "")
            + ": "
            + "; ".join(reasons),
            "shut down or suspend the VM first (`vml run` runs a QEMU VM so that VML can save "
            "it while it runs; --qmp SOCKET saves a QEMU of yours through its QMP socket), or "
            "pass --force-running to save it anyway (the saved disks may be inconsistent)",
        )
    if own is not None and not live and not force_running:
        raise VMRunning(
            f"the VM in {root} runs under `vml run` (QEMU pid {own.pid})",
            "`vml stop --save` saves its running state and stops it (then commit); `vml stop` "
            "powers it off; --force-running saves it anyway (crash-consistent)",
        )
    info = _inspect(root, scan, bool(reasons) or own is not None)
    external = info.external
    if external and not include_external:
        raise AreaError(
            f"the VM in {root} needs files outside the area: " + ", ".join(external),
            "pass --include-external to save them too, or move them into the area",
        )
    return info
