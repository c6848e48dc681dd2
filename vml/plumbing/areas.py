"""Working areas: the folder a VM lives in, and VML's one hidden folder in it.

``.vml/`` inside an area holds:

- ``area.json``: the repository the area uses, the entry it holds, the branch
  it follows, and ``pending`` while a checkout is rewriting it;
- ``lock``: an ``flock`` held by the one vml command that may change the
  area (commit, checkout, restore); it dies with its process;
- ``cache/``: the area cache (see cache.py), an accelerator only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat as stat_mod
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vml.errors import AreaError, RepositoryBusy
from vml.plumbing.repository import hold_flock, write_atomic

AREA_DIR = ".vml"
STATE_NAME = "area.json"
LOCK_NAME = "lock"


@dataclass
class AreaState:
    """The contents of ``.vml/area.json``."""

    area_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    repository: str | None = None
    entry: str | None = None  # hex commit id of the entry the area holds
    branch: str | None = None  # branch that saving in this area advances
    pending: str | None = None  # hex commit id of an interrupted checkout
    # Where the area last saw the branch (it set or checked it out there): it
    # moves the branch only from there, never over another area's save.
    branch_at: str | None = None


def vml_dir(area: Path) -> Path:
    """The area's ``.vml`` folder."""
    return area / AREA_DIR


def load_state(area: Path) -> AreaState | None:
    """The area's state, or None for a folder VML has never used."""
    try:
        doc = json.loads((vml_dir(area) / STATE_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AreaError(
            f"{area}/.vml/area.json is unreadable ({e})",
            "remove the .vml folder to start the area afresh (its entries stay in the repository)",
        ) from None
    hexid = re.compile(r"^[0-9a-f]{40}$")
    ok = isinstance(doc, dict) and isinstance(doc.get("area_id", ""), str)
    for key in ("entry", "pending", "branch_at"):
        v = doc.get(key) if ok else None
        ok = ok and (v is None or (isinstance(v, str) and bool(hexid.match(v))))
    for key in ("repository", "branch"):
        ok = ok and isinstance(doc.get(key), str | None)
    if not ok:
        raise AreaError(
            f"{area}/.vml/area.json is malformed",
            "remove the .vml folder to start the area afresh (its entries stay in the repository)",
        )
    known = {k: doc.get(k) for k in AreaState.__dataclass_fields__ if k in doc}
    return AreaState(**known)


def save_state(area: Path, state: AreaState) -> None:
    """Write the area's state atomically and durably."""
    d = vml_dir(area)
    d.mkdir(exist_ok=True)
    write_atomic(d / STATE_NAME, json.dumps(asdict(state), indent=1).encode() + b"\n")


#: How long a command needing the area (``vml stop``, a save, a checkout)
#: waits for the keeper of ``vml run`` that holds the area lock to be done
#: (reading the bitmaps takes well under a second; ``qemu-img map`` is
#: given 30 s at most).
KEEPING_WAIT = 60.0


def keeper_pid(area: Path) -> int | None:
    """The pid of the keeper of the VM VML runs for ``area``, while it lives."""
    from vml.plumbing.vm.qemu import RunPaths

    try:
        fd = os.open(RunPaths(area).keeper_lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held: it lives
        with contextlib.suppress(ValueError, IndexError):  # (its pid not written yet)
            return int(os.pread(fd, 32, 0).split()[0])
        return 0
    else:
        return None
    finally:
        os.close(fd)


def keeping(area: Path) -> bool:
    """Whether the keeper holds the area lock (keeping the ranges of a guest that powered itself off)."""
    pid = keeper_pid(area)
    try:
        return pid is not None and int((vml_dir(area) / LOCK_NAME).read_text().split()[0]) == pid
    except (OSError, ValueError, IndexError):
        return False


@contextmanager
def lock_area(area: Path, timeout: float = 0.0) -> Iterator[None]:
    """Hold the area's lock, so one vml command at a time changes the area.

    Raises :class:`RepositoryBusy` when another command holds it (after
    ``timeout`` seconds); the keeper of a VM `vml run` started, keeping
    what its guest changed before it powered off, is waited for (up to
    ``KEEPING_WAIT``), whatever ``timeout``.  A folder VML has not used yet gets no lasting
    ``.vml`` folder from a command that fails: when there is no ``area.json``
    on release, the lock file and the then empty ``.vml`` are removed.
    """
    d = vml_dir(area)
    d.mkdir(exist_ok=True)
    lock = d / LOCK_NAME
    busy = f"the area {area} is in use by another vml command"
    with ExitStack() as held:
        try:
            held.enter_context(hold_flock(lock, timeout, busy))
        except RepositoryBusy:
            if timeout >= KEEPING_WAIT or not keeping(area):
                raise
            # The keeper of `vml run` holds the area a moment once the guest
            # powered itself off (it keeps the disks' changed ranges, then
            # ends QEMU): whoever comes next waits for it, as `vml stop` does,
            # instead of calling the area busy (a script's `vml commit` right
            # after the VM ended).
            held.enter_context(hold_flock(lock, KEEPING_WAIT, busy))
        try:
            yield
        finally:
            if not (d / STATE_NAME).exists():
                # Still locked: a waiter re-checks the file it locked (hold_flock).
                lock.unlink(missing_ok=True)
                with suppress(OSError):
                    d.rmdir()


class AreaLocks:
    """The areas one command holds locked across several steps, until it closes this.

    ``flock`` is not re-entrant (a second lock of one area, even from this
    process, is refused): a command made of several rewrites (``prune``,
    ``rm`` of several entries) takes its areas once, here, and each step
    takes through this what it needs, the held ones at no cost.
    """

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._keys: set[tuple[int, int]] = set()

    def take(self, area: Path) -> None:
        """Lock ``area`` unless held already (RepositoryBusy when another command holds it)."""
        key = folder_key(area)
        if key not in self._keys:
            self._stack.enter_context(lock_area(area))
            self._keys.add(key)

    def close(self) -> None:
        """Release every lock taken."""
        self._stack.close()
        self._keys.clear()

    def __enter__(self) -> AreaLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stat_signature(st: os.stat_result) -> list[int]:
    """What must stay equal for a file to count as unchanged without reading it."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


@dataclass
class AreaFile:
    """A regular file found in an area."""

    path: str  # relative, posix separators
    stat: os.stat_result


@dataclass
class Scan:
    """What an area holds, sorted by path, ``.vml`` and ignored paths aside."""

    files: list[AreaFile]
    empty_dirs: list[str]
    folders: list[AreaFile]  # every folder, with its stat
    root: os.stat_result  # the area's own folder


def folder_key(path: Path) -> tuple[int, int]:
    """What identifies a folder whatever path reaches it (bind mounts, links)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def same_folder(a: Path, b: Path) -> bool:
    """True when two paths reach one folder (by path, or by device and inode)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return folder_key(a) == folder_key(b)
    except OSError:
        return False


def scan_area(
    area: Path,
    is_ignored: Callable[[str, bool], bool],
    foreign: dict[tuple[int, int], str] | None = None,
) -> Scan:
    """The area's regular files and folders, without ``.vml`` and ignored paths.

    Symbolic links and special files are refused: an entry must rebuild to
    exactly what was saved, and a link could point anywhere.  A folder that
    is one of ``foreign`` (by device and inode: the repository, reached
    through a bind mount) or the area itself again is refused too: it would
    be saved into itself, or for ever.
    """
    root = os.stat(area)
    refused = dict(foreign or {})
    refused[(root.st_dev, root.st_ino)] = f"the area {area} itself"
    files: list[AreaFile] = []
    empty_dirs: list[str] = []
    folders: list[AreaFile] = []

    def walk(d: Path, rel: str) -> bool:
        found = False
        try:
            items = sorted(os.scandir(d), key=lambda e: e.name)
        except PermissionError:
            raise AreaError(f"cannot read folder {d}", "check its permissions") from None
        for it in items:
            r = f"{rel}{it.name}"
            if r == AREA_DIR:
                continue
            st = it.stat(follow_symlinks=False)
            is_dir = stat_mod.S_ISDIR(st.st_mode)
            if is_ignored(r, is_dir):
                continue
            found = True
            if stat_mod.S_ISLNK(st.st_mode):
                raise AreaError(
                    f"{r} is a symbolic link; VML saves regular files only",
                    "replace the link with the file it points to, or list it in .vmlignore",
                )
            if is_dir:
                what = refused.get((st.st_dev, st.st_ino))
                if what is not None:
                    raise AreaError(
                        f"the folder {r} of the area is {what} (mounted or linked there)",
                        "unmount it or move it out of the area, or list it in .vmlignore",
                    )
                folders.append(AreaFile(r, st))
                if not walk(Path(it.path), r + "/"):
                    empty_dirs.append(r)
            elif stat_mod.S_ISREG(st.st_mode):
                files.append(AreaFile(r, st))
            else:
                raise AreaError(f"{r} is not a regular file", "remove it or list it in .vmlignore")
        return found

    walk(area, "")
    return Scan(files, empty_dirs, sorted(folders, key=lambda f: f.path), root)
