"""Save a running libvirt domain through libvirt, and resume it, with ``virsh``.

VML talks to libvirt through the ``virsh`` command (libvirt-clients), not
the ``libvirt-python`` binding: that is a C extension built against the
installed libvirt (no wheel on PyPI), while ``virsh`` comes with every
libvirt, speaks to any daemon (``-c URI``), and the few calls needed here
each give one clear error line.

``find_domain(area)``: the active domain (running or paused) whose disks are
files of the area, if any.

``libvirt_snapshot(area, domain)``, for ``vml commit`` (measurements in
``docs/VMS.md``: a pause of ~0.3 s, against ~2 s of ``virsh save`` +
``virsh restore``, whatever the disks' size):

1. ``virsh snapshot-create-as --live --no-metadata --atomic`` with
   ``--memspec`` into the save's stage: libvirt's save image (the domain's
   XML, then QEMU's migration stream with the RAM), written while the guest
   runs; and one ``--diskspec`` per disk of the area: a qcow2 overlay in
   ``.vml/overlays/``.  libvirt pauses the guest for the last round of
   memory and while it makes the overlays, then the guest runs on, writing
   into them: the area's images stay exactly as they were at the pause,
   consistent with the memory, and the save reads them where they are.
2. After the save, ``virsh blockcommit --active --shallow --pivot`` merges each
   overlay back into its image; the domain runs on the area's images again
   and the overlays are deleted.  A save killed in between leaves the
   domain on its overlays: the next save (``recover``) merges them first.

``resume_domain``: ``virsh restore`` of the save image with the domain's XML
pointing into the area it is checked out to.  libvirt refuses another name
or UUID there, so the saved domain resumes under its own: one that runs
already is refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vml.errors import AreaError, VMControlError, VMRunning
from vml.plumbing.vm.ignore import RESUME_SUFFIX, VML_DIR
from vml.plumbing.vm.qemu import RunPaths, now_iso
from vml.plumbing.vm.resume import (
    STATE_SUFFIXES,
    ForeignSnapshot,
    ResumeInfo,
    discard,
    drop_overlay,
    drop_stage,
    new_stage,
    remap,
    stem_for,
)

SYSTEM_URI = "qemu:///system"
OVERLAYS = "overlays"


def virsh(uri: str | None, *args: str, timeout: float = 120.0) -> str:
    """Run ``virsh [-c uri] args`` and return its output; ``VMControlError`` with its words."""
    cmd = ["virsh", "-q", *(["-c", uri] if uri else []), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise VMControlError(
            "virsh is not installed", "install libvirt-clients (apt-get install libvirt-clients)"
        ) from None
    except subprocess.TimeoutExpired:
        raise VMControlError(
            f"virsh {args[0]} did not answer in {timeout:.0f} s", "is libvirtd running?"
        ) from None
    if done.returncode != 0:
        lines = [ln.removeprefix("error: ") for ln in done.stderr.splitlines() if ln.strip()]
        why = "; ".join(ln for ln in lines if not ln.startswith("Failed to ")) or "; ".join(lines)
        raise VMControlError(f"virsh {args[0]} failed: {why or 'no message'}", "")
    return done.stdout


def _parse(text: str, what: str) -> ET.Element:
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise VMControlError(f"{what} carries a DTD", "")
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise VMControlError(f"{what} is not XML: {e}", "") from None


@dataclass(frozen=True)
class DomainDisk:
    """One ``<disk>`` of a domain."""

    target: str  # vda, sdb, ...
    device: str  # disk, cdrom, floppy, lun
    source: str | None  # the file or block device, None when empty
    readonly: bool
    network: bool = False  # served over the network (rbd, nbd, iscsi...): no file here


@dataclass(frozen=True)
class Domain:
    """An active libvirt domain."""

    uri: str | None
    name: str
    uuid: str
    kind: str  # the domain type: kvm or qemu (TCG)
    machine: str  # the concrete machine type, e.g. pc-q35-7.2
    disks: tuple[DomainDisk, ...]


def parse_domain(text: str, uri: str | None = None) -> Domain:
    """A domain from its XML (``virsh dumpxml``)."""
    root = _parse(text, "the domain XML")
    disks = []
    for d in root.findall("devices/disk"):
        src, target = d.find("source"), d.find("target")
        path = (src.get("file") or src.get("dev") or src.get("volume")) if src is not None else None
        disks.append(
            DomainDisk(
                target.get("dev", "") if target is not None else "",
                d.get("device", "disk"),
                path,
                d.find("readonly") is not None,
                d.get("type") == "network" or (src is not None and path is None),
            )
        )
    os_type = root.find("os/type")
    return Domain(
        uri,
        (root.findtext("name") or "").strip(),
        (root.findtext("uuid") or "").strip(),
        root.get("type", "qemu"),
        (os_type.get("machine", "") if os_type is not None else ""),
        tuple(disks),
    )


def inside(area: Path, path: str | None) -> str | None:
    """``path`` as an area-relative name, or None when it is not in the area."""
    if not path or not path.startswith("/"):
        return None
    real_area = os.path.realpath(area)
    real = os.path.realpath(path)
    if not real.startswith(real_area.rstrip(os.sep) + os.sep):
        return None
    return Path(os.path.relpath(real, real_area)).as_posix()


def find_domain(area: Path, uri: str | None = None) -> Domain | None:
    """The active domain of ``uri`` (default ``qemu:///system``) using files of ``area``.

    None when there is none, ``virsh`` is missing or libvirt cannot be
    reached (unless ``uri`` was given: then that is an error).  Several
    domains on one area are refused.
    """
    if shutil.which("virsh") is None:
        if uri is not None:
            virsh(uri, "version")  # raises: not installed
        return None
    try:
        names = virsh(uri or SYSTEM_URI, "list", "--name", timeout=30).split()
    except VMControlError:
        if uri is not None:
            raise
        return None
    found = []
    for name in names:
        try:
            dom = parse_domain(virsh(uri or SYSTEM_URI, "dumpxml", name), uri or SYSTEM_URI)
        except VMControlError:
            continue  # it went away meanwhile
        if any(inside(area, d.source) for d in dom.disks):
            found.append(dom)
    if len(found) > 1:
        raise AreaError(
            f"several libvirt domains use files of {area}: " + ", ".join(d.name for d in found),
            "shut all but one down",
        )
    return found[0] if found else None


def _overlay_dir(area: Path) -> Path:
    return area / VML_DIR / OVERLAYS


def _merge(dom: Domain, target: str, overlay: Path) -> None:
    """Merge ``overlay`` (the disk ``target`` runs on) back into its image; delete it."""
    # --shallow: only VML's overlay goes into the image under it; without it
    # virsh flattens the whole chain into its bottom file (the user's own
    # base image, maybe outside the area or shared with other VMs).
    virsh(
        dom.uri,
        "blockcommit",
        dom.name,
        target,
        "--active",
        "--shallow",
        "--pivot",
        "--wait",
        timeout=3600,
    )
    problem = drop_overlay(overlay)
    if problem is not None:
        raise VMControlError(problem)


def recover(area: Path, dom: Domain) -> Domain:
    """Merge back the overlays a killed save left the domain on; the domain as it is then."""
    left = _on_overlays(area, dom)
    if not left:
        return dom
    for target, _ in left:
        # A merge a killed save left ready: pivot it (none there: virsh says so).
        with contextlib.suppress(VMControlError):
            virsh(dom.uri, "blockjob", dom.name, target, "--pivot", timeout=600)
    dom = parse_domain(virsh(dom.uri, "dumpxml", dom.name), dom.uri)
    still = _on_overlays(area, dom)
    for _, overlay in left:
        if overlay not in {o for _, o in still}:
            drop_overlay(overlay)  # pivoted: the domain is off it
    for target, overlay in still:
        _merge(dom, target, overlay)
    return parse_domain(virsh(dom.uri, "dumpxml", dom.name), dom.uri)


def _on_overlays(area: Path, dom: Domain) -> list[tuple[str, Path]]:
    """The disks of ``dom`` running on VML's overlays in ``area``: (target, overlay)."""
    return [
        (d.target, Path(d.source))
        for d in dom.disks
        if d.source and (inside(area, d.source) or "").startswith(f"{VML_DIR}/{OVERLAYS}/")
    ]


def _spec(path: Path) -> str:
    """A path inside a virsh ``--memspec``/``--diskspec`` value (commas doubled)."""
    return str(path).replace(",", ",,")


def _plan(area: Path, dom: Domain) -> tuple[list[DomainDisk], list[DomainDisk]]:
    """The disks to snapshot (the area's, written) and those to leave; refuse others."""
    ours, left, outside = [], [], []
    for d in dom.disks:
        if d.network and not d.readonly and d.device not in ("cdrom", "floppy"):
            outside.append(f"{d.target} (a network disk)")
        elif d.device in ("cdrom", "floppy") or d.readonly or not d.source:
            left.append(d)
        elif inside(area, d.source) is None:
            outside.append(f"{d.target} ({d.source})")
        else:
            ours.append(d)
    if outside:
        raise AreaError(
            f"the domain {dom.name} writes disks outside the area {area}: {', '.join(outside)}",
            "move them into the area (the entry holds the VM's disks), or make them read-only",
        )
    return ours, left


class _Lifecycle:
    """``virsh event``: when libvirt paused and resumed the domain (the guest's pause)."""

    def __init__(self, dom: Domain) -> None:
        self.proc: subprocess.Popen[str] | None = None
        with contextlib.suppress(OSError):
            self.proc = subprocess.Popen(
                ["virsh", *(["-c", dom.uri] if dom.uri else []), "event", "--domain", dom.name,
                 "--event", "lifecycle", "--loop", "--timestamp", "--timeout", "3600"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            time.sleep(0.2)  # registered: it connects and subscribes in a few ms

    def close(self) -> None:
        """End it without reading (the snapshot failed)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.communicate()

    def pause(self) -> float | None:
        """Seconds from "Suspended" to "Resumed", or None when not seen."""
        if self.proc is None:
            return None
        time.sleep(0.1)  # the last event on its way
        # SIGINT ends its loop normally, so what it buffered is written out.
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        times: dict[str, float] = {}
        for line in out.splitlines():
            m = re.match(r"(\S+ \S+?): event 'lifecycle' .*: (Suspended|Resumed)", line)
            if m and m.group(2) not in times:
                with contextlib.suppress(ValueError):
                    times[m.group(2)] = datetime.strptime(
                        m.group(1), "%Y-%m-%d %H:%M:%S.%f%z"
                    ).timestamp()
        if "Suspended" in times and "Resumed" in times:
            return max(times["Resumed"] - times["Suspended"], 0.0)
        return None


def _hypervisor_version(uri: str | None) -> str:
    with contextlib.suppress(VMControlError):
        m = re.search(r"Running hypervisor: QEMU (\S+)", virsh(uri, "version"))
        if m:
            return m.group(1)
    return ""


@contextlib.contextmanager
def libvirt_snapshot(
    area: Path, dom: Domain, *, timeout: float = 600.0
) -> Iterator[ForeignSnapshot]:
    """Save the running domain ``dom`` of ``area`` through libvirt; see the module doc.

    Yields the staged save image and resume file: the area's disk images
    themselves are the consistent disks until the context ends, when the
    domain goes back onto them.
    """
    dom = recover(area, dom)
    ours, left = _plan(area, dom)
    stage = new_stage(area)
    overlays: list[tuple[str, Path]] = []
    try:
        stem = stem_for(dom.name, "vm")
        state = stage / (stem + STATE_SUFFIXES["libvirt"])
        stamp = f"{os.getpid()}-{time.time_ns()}"
        args = ["snapshot-create-as", dom.name, "--name", f"vml-{stamp}", "--no-metadata",
                "--live", "--atomic", "--memspec", f"file={_spec(state)},snapshot=external"]  # fmt: skip
        _overlay_dir(area).mkdir(parents=True, exist_ok=True)
        for d in ours:
            overlays.append((d.target, _overlay_dir(area) / f"{d.target}-{stamp}.qcow2"))
            args += ["--diskspec", f"{d.target},snapshot=external,file={_spec(overlays[-1][1])}"]
        args += [a for d in left for a in ("--diskspec", f"{d.target},snapshot=no")]
        watch = _Lifecycle(dom)
        t = time.monotonic()
        try:
            virsh(dom.uri, *args, timeout=timeout)
        except BaseException:
            watch.close()
            # --atomic makes all or none, but a virsh killed or timed out
            # leaves libvirtd's job going: it may have put the domain on
            # them since.  Those are merged back, the others deleted; what
            # cannot be told now, the next save's recover finds.
            with contextlib.suppress(VMControlError):
                _merge_all(area, dom, overlays)
            overlays.clear()
            raise
        took = time.monotonic() - t
        pause = watch.pause() or took
        info = _resume_info(area, dom, state.name)
        resume = stage / (stem + RESUME_SUFFIX)
        info.write(resume)
        record: dict[str, object] = {
            "via": "libvirt", "pause_seconds": round(pause, 4), "state_file": state.name,
            "resume_file": resume.name, "qemu": info.qemu, "machine": info.machine,
            "accel": info.accel, "saved": info.saved, "steps": {"snapshot": round(took, 4)},
            "copied_bytes": 0, "domain": dom.name,
        }  # fmt: skip
        yield ForeignSnapshot({state.name: state, resume.name: resume}, pause, record)
    finally:
        try:
            _merge_all(area, dom, overlays)
        finally:
            drop_stage(stage)


def _merge_all(area: Path, dom: Domain, overlays: list[tuple[str, Path]]) -> None:
    """Merge back each of ``overlays`` the domain runs on now; delete those it does not."""
    if not overlays:
        return
    now = parse_domain(virsh(dom.uri, "dumpxml", dom.name), dom.uri)
    # Only a disk on VML's overlay is merged: a blockcommit of any other
    # would merge the user's own image into its backing file.
    on = {os.path.realpath(o): t for t, o in _on_overlays(area, now)}
    problems: list[str] = []
    for _, overlay in overlays:
        target = on.get(os.path.realpath(overlay))
        if target is None:
            # libvirt made none, or it is merged already
            problems += filter(None, [drop_overlay(overlay)])
            continue
        try:
            _merge(now, target, overlay)
        except VMControlError as e:
            problems.append(f"{target}: {e.message}")
    with contextlib.suppress(OSError):
        _overlay_dir(area).rmdir()
    if problems:
        raise VMControlError(
            f"the domain {dom.name} still runs on overlays in {_overlay_dir(area)} "
            f"({'; '.join(problems)})",
            "the next `vml commit` merges them back; or `virsh blockcommit "
            f"{dom.name} TARGET --active --shallow --pivot` for each",
        )


def _resume_info(area: Path, dom: Domain, state: str) -> ResumeInfo:
    how = (
        f"`vml run AREA` resumes it; by hand: `virsh save-image-dumpxml {state} > d.xml`, "
        f"point the paths in d.xml into this area, `virsh restore {state} --xml d.xml` "
        f"(no other domain {dom.name} may run)"
    )
    return ResumeInfo(
        via="libvirt",
        state=state,
        area=str(area.resolve()),
        saved=now_iso(),
        qemu=_hypervisor_version(dom.uri),
        machine=dom.machine,
        accel="kvm" if dom.kind == "kvm" else "tcg",
        domain=dom.name,
        uuid=dom.uuid,
        resume=how,
    )


# --- resuming -------------------------------------------------------------------------


def remap_xml(text: str, old: str, new: str) -> str:
    """A domain XML with every path into folder ``old`` pointing into ``new``."""
    root = _parse(text, "the saved domain XML")
    for el in root.iter():
        if el.text and el.text.strip():
            el.text = (
                remap(el.text.strip(), old, new) if el.text.strip().startswith(old) else el.text
            )
        for k, v in el.attrib.items():
            if v.startswith(old):
                el.set(k, remap(v, old, new))
    return ET.tostring(root, encoding="unicode")


def domain_state(uri: str | None, name: str) -> str | None:
    """``virsh domstate`` of ``name`` (``running``, ``paused``, ``shut off``...), None if unknown."""
    try:
        return virsh(uri, "domstate", name).strip() or None
    except VMControlError:
        return None


def restore_command(area: Path, info: ResumeInfo, uri: str | None) -> list[str]:
    """The ``virsh restore`` that resumes ``info`` in ``area`` (the XML beside ``.vml/run``)."""
    xml = RunPaths(area).dir / "restore.xml"
    return ["virsh", *(["-c", uri] if uri else []), "restore", str(area / info.state),
            "--xml", str(xml.absolute()), "--running"]  # fmt: skip


def resume_domain(area: Path, rel: str, info: ResumeInfo, uri: str | None) -> list[str]:
    """Resume the save image of ``info`` through libvirt, its paths pointing into ``area``.

    The caller holds the area's lock.  Refuses (``VMRunning``) when a domain
    of that name runs.  The state and resume file are deleted once it runs.
    Returns the ``virsh restore`` command it ran.
    """
    uri = uri or SYSTEM_URI
    state = domain_state(uri, info.domain)
    if state in ("running", "paused", "in shutdown", "pmsuspended"):
        raise VMRunning(
            f"the libvirt domain {info.domain} is {state}; the saved state resumes under "
            "the same name and UUID (libvirt allows no other)",
            f"shut it down or `virsh destroy {info.domain}` first (it was saved from {info.area})",
        )
    text = virsh(uri, "save-image-dumpxml", str((area / info.state).absolute()), "--security-info")
    xml = remap_xml(text, info.area, str(area.absolute()))
    cmd = restore_command(area, info, uri)
    target = Path(cmd[cmd.index("--xml") + 1])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(xml, encoding="utf-8")
    try:
        virsh(uri, *cmd[cmd.index("restore") :], timeout=600)
    finally:
        target.unlink(missing_ok=True)
    discard(area, rel)
    return cmd
