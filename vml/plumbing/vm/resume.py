"""Running states saved from a QEMU VML did not start: the resume file, the stage.

``vml commit --qmp SOCKET`` (``foreign``) and ``vml commit`` of a running
libvirt domain (``libvirt``) save a running VM in a form its own tools
resume, plus one small JSON file that says how, ``<stem>.resume.json``::

    {"vml_resume": 1, "via": "qmp", "state": "lab.migstream",
     "area": "/home/me/vms/lab", "saved": "2026-01-05T10:00:00Z",
     "qemu": "7.2.22", "machine": "pc-q35-7.2", "accel": "tcg",
     "command": ["qemu-system-x86_64", "-m", "2G", ...], "cwd": "/home/me",
     "domain": "", "uuid": "", "resume": "how to resume it by hand"}

- ``via`` ``qmp``: ``state`` is QEMU's own migration stream (RAM included),
  which ``qemu-system-* … -incoming "exec:cat FILE"`` loads; ``command`` is
  the command line of the QEMU it was saved from and ``cwd`` its working
  folder (empty if they could not be read), which ``vml run`` runs again
  with the area's paths.
- ``via`` ``libvirt``: ``state`` is a libvirt save image (``virsh save``
  format, the domain's XML inside), which ``virsh restore`` loads;
  ``domain`` and ``uuid`` name the domain.

``area`` is the folder it was saved from: paths into it (in the command
line, in the domain XML) are paths into whatever area the entry is checked
out to.  ``vml run`` resumes such an area and then deletes both files (a
state resumed twice would run against disks that moved on).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vml.errors import AreaError, IncompatibleState
from vml.plumbing.vm.durable import write_durably
from vml.plumbing.vm.ignore import RESUME_SUFFIX, VML_DIR

FORMAT_VERSION = 1
VIAS = ("qmp", "libvirt")
#: Suffix of the state file for each way of saving.
STATE_SUFFIXES = {"qmp": ".migstream", "libvirt": ".libvirt-save"}


@dataclass(frozen=True)
class ResumeInfo:
    """The content of ``<stem>.resume.json``; see the module doc."""

    via: str
    state: str
    area: str
    saved: str
    qemu: str = ""
    machine: str = ""
    accel: str = ""
    command: tuple[str, ...] = ()
    cwd: str = ""
    domain: str = ""
    uuid: str = ""
    resume: str = ""

    def to_json(self) -> dict[str, object]:
        """The file's content."""
        doc: dict[str, object] = {"vml_resume": FORMAT_VERSION, **asdict(self)}
        doc["command"] = list(self.command)
        return doc

    def write(self, path: Path) -> None:
        """Write it to ``path`` (atomically, durably: a save relies on it once it is taken)."""
        write_durably(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())


def read_resume(area: Path, rel: str) -> ResumeInfo:
    """Read ``rel`` of ``area``; ``IncompatibleState`` naming what is wrong."""
    where = area / rel
    try:
        if where.stat().st_size > 1 << 20:
            raise ValueError("bigger than 1 MiB")
        doc = json.loads(where.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("vml_resume") != FORMAT_VERSION:
            raise ValueError(f"not a version {FORMAT_VERSION} resume file")
        if doc.get("via") not in VIAS:
            raise ValueError(f"via {doc.get('via')!r}")
        strings = {k: doc.get(k, "") for k in ResumeInfo.__dataclass_fields__ if k != "command"}
        if not all(isinstance(v, str) for v in strings.values()):
            raise ValueError("a field is not a string")
        command = doc.get("command", [])
        if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
            raise ValueError("command is not a list of strings")
        state = str(strings["state"])
        if "/" in state or not state.endswith(STATE_SUFFIXES[str(doc["via"])]):
            raise ValueError(f"state {state!r}")
    except (OSError, ValueError) as e:
        raise IncompatibleState(
            f"{rel} is not a saved running state VML can resume ({e})",
            "remove it (and the state it names) to start the VM afresh",
        ) from None
    return ResumeInfo(**{k: str(v) for k, v in strings.items()}, command=tuple(command))


def find_resume(area: Path) -> str | None:
    """The area's ``*.resume.json`` (at its root), or None; ``AreaError`` if several."""
    try:
        names = sorted(n for n in os.listdir(area) if n.endswith(RESUME_SUFFIX))
    except OSError:
        return None
    names = [n for n in names if (area / n).is_file()]
    if len(names) > 1:
        raise AreaError(
            f"the area {area} holds several saved running states: {', '.join(names)}",
            "keep one",
        )
    return names[0] if names else None


def discard(area: Path, rel: str) -> None:
    """Delete a resume file and the state it names (after a resume, or to boot afresh)."""
    try:
        info = read_resume(area, rel)
        (area / info.state).unlink(missing_ok=True)
    finally:
        (area / rel).unlink(missing_ok=True)


def stem_for(name: str, fallback: str) -> str:
    """A file stem from a VM's name: letters, digits, ``.``, ``_`` and ``-``."""
    clean = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:64].strip("._-")
    return clean if clean and clean[0].isalnum() else fallback


def remap(text: str, old: str, new: str) -> str:
    """``text`` with paths into folder ``old`` pointing into ``new`` instead.

    Matches ``old`` itself and ``old/...`` wherever they start a path in
    ``text`` (a whole value, or after ``=``/``:``, as in QEMU options), in
    plain and in QEMU's comma-doubled spelling.
    """
    if not old or old == new:
        return text
    pairs = [(old, new)]
    if "," in old:
        pairs.append((old.replace(",", ",,"), new.replace(",", ",,")))
    for o, n in pairs:
        out, i = [], 0
        while (j := text.find(o, i)) >= 0:
            end = j + len(o)
            starts = j == 0 or text[j - 1] in "=:,"
            ends = end == len(text) or text[end] in "/,"
            out.append(text[i:j] + (n if starts and ends else o))
            i = end
        text = "".join(out) + text[i:]
    return text


# --- the stage: copies a save makes, in the area's file system -----------------


def new_stage(area: Path) -> Path:
    """``<area>/.vml/stage/<pid>/``, empty; what dead savers left there is removed first."""
    root = area / VML_DIR / "stage"
    root.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(root):
        if name.isdigit() and not Path(f"/proc/{name}").exists():
            shutil.rmtree(root / name, ignore_errors=True)
    stage = root / str(os.getpid())
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def drop_stage(stage: Path) -> None:
    """Remove a stage (and the stage folder, when no other save uses it)."""
    shutil.rmtree(stage, ignore_errors=True)
    with contextlib.suppress(OSError):
        stage.parent.rmdir()


@dataclass
class ForeignSnapshot:
    """A consistent running state of a VM VML did not start, staged for a save."""

    #: Area-relative name -> file to read instead (state, resume file, disk copies).
    files: dict[str, Path]
    #: How long the guest was paused, in seconds.
    pause_seconds: float
    #: What the entry records (``vm.live``).
    live: dict[str, object] = field(default_factory=dict)

    def record(self) -> dict[str, object]:
        """``vm.live`` of the entry."""
        return self.live


def drop_overlay(overlay: Path) -> str | None:
    """Delete an overlay the VM no longer runs on; what went wrong, or None.

    A merge loop goes on to the next disk whatever happens here: one file
    that cannot be deleted must not leave the other disks on overlays.
    """
    try:
        overlay.unlink(missing_ok=True)
    except OSError as e:
        return (
            f"{overlay.name} is merged back but could not be deleted ({e.strerror}): delete it; "
            "never merge it again, the images are newer"
        )
    return None
