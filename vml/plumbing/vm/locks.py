"""Is the VM in an area running?  Three independent signs, each cheap.

1. VMware: while a VM runs, VMware Workstation/Player/Fusion keeps a
   ``<file>.lck`` folder (older versions: a file) next to the ``.vmx`` and each
   disk it has open.  A left-over ``.lck`` after a crash also blocks VMware
   itself, so reporting it is right either way.
2. QEMU: since 2.10 qemu takes open-file-description (OFD) byte-range locks
   on its images (bytes 100+ for permissions it holds, 200+ for permissions
   it refuses to share).  ``F_OFD_GETLK`` asks the kernel whether any other
   open file description holds a lock that would conflict with a write lock
   over the whole file.
3. Any hypervisor, Linux only: a process other than us has an image or
   state file open for writing, seen through ``/proc/<pid>/fd`` and
   ``/proc/<pid>/fdinfo``.  This is how a running VirtualBox VM shows up:
   VirtualBox keeps no lock file in the VM folder (its session lock lives in
   the VBoxSVC process) and takes no byte-range locks on POSIX hosts.
   Processes of other users are invisible without privileges, so this sign
   can miss; it never invents one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterable
from pathlib import Path

#: struct flock on Linux (x86_64, aarch64): short l_type, short l_whence,
#: off_t l_start, off_t l_len, pid_t l_pid, plus tail padding to 32 bytes.
_FLOCK = "@hhqqi4x"
_LOCK_NAMES = {fcntl.F_RDLCK: "read", fcntl.F_WRLCK: "write"}


def lck_entries(root: Path, names: Iterable[str]) -> list[str]:
    """Reasons for every VMware ``*.lck`` entry among ``names`` (relative paths)."""
    reasons = []
    for rel in names:
        if rel.lower().endswith(".lck"):
            kind = "folder" if (root / rel).is_dir() else "file"
            reasons.append(f"VMware lock {kind} {rel} exists")
    return reasons


def held_lock(path: Path) -> str | None:
    """Describe a byte-range lock another open file holds on ``path``, or ``None``.

    Uses ``F_OFD_GETLK`` (Linux 3.15+), falling back to ``F_GETLK``.  Opening
    the file read-only and closing it again cannot disturb the other
    process's locks: closing only drops locks *this* process holds.
    """
    cmd = getattr(fcntl, "F_OFD_GETLK", None) or fcntl.F_GETLK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, cmd, query)
    except OSError:
        return None
    finally:
        os.close(fd)
    l_type, _whence, start, length, pid = struct.unpack(_FLOCK, answer)
    if l_type == fcntl.F_UNLCK:
        return None
    kind = _LOCK_NAMES.get(l_type, "a")
    where = f"bytes {start}-{start + length - 1}" if length else f"bytes {start}-"
    who = f" by pid {pid}" if pid > 0 else ""
    return f"{kind} lock on {where}{who}"


def _fd_writable(fdinfo: Path) -> bool:
    """Whether the fd described by a ``/proc/<pid>/fdinfo/<fd>`` file is open for writing."""
    try:
        text = fdinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags:"):
            try:
                flags = int(line.split()[1], 8)
            except (IndexError, ValueError):
                return False
            return flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    return False


def _process_name(pid: str) -> str:
    try:
        return Path("/proc", pid, "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def open_for_writing(files: dict[tuple[int, int], str]) -> dict[str, list[str]]:
    """Map each of ``files`` (keyed by (st_dev, st_ino)) to the processes writing it.

    Returns ``{relative path: ["qemu-system-x86 (pid 123)", ...]}`` for files
    that another process holds open for writing.  Empty when ``/proc`` is
    absent (not Linux).  Cost is one ``stat`` per open fd on the host, paid
    only when asked.
    """
    found: dict[str, list[str]] = {}
    if not files:
        return found
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return found
    for pid in pids:
        # Plain strings, not Path objects: every open fd of the host is looked at.
        fd_dir = f"/proc/{pid}/fd/"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or another user's process
        for fd in fds:
            with contextlib.suppress(OSError):
                st = os.stat(fd_dir + fd)
                rel = files.get((st.st_dev, st.st_ino))
                if rel is None or not _fd_writable(Path("/proc", pid, "fdinfo", fd)):
                    continue
                holder = f"{_process_name(pid)} (pid {pid})"
                if holder not in found.setdefault(rel, []):
                    found[rel].append(holder)
    return found


def open_files(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file process ``pid`` has open (empty if unknown)."""
    found: set[tuple[int, int]] = set()
    fd_dir = Path("/proc", str(pid), "fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return found
    for fd in fds:
        with contextlib.suppress(OSError):
            st = os.stat(fd_dir / fd)
            found.add((st.st_dev, st.st_ino))
    return found


def image_reasons(root: Path, rels: Iterable[str], own_pid: int | None = None) -> list[str]:
    """Reasons the image/state files ``rels`` (relative to ``root``) look in use.

    ``own_pid`` is the QEMU that VML runs for this area: its locks and open
    files are no reason (the caller knows it runs); anyone else's are.
    """
    reasons: list[str] = []
    by_id: dict[tuple[int, int], str] = {}
    own = open_files(own_pid) if own_pid is not None else set()
    for rel in rels:
        path = root / rel
        try:
            st = path.lstat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        by_id[key] = rel
        lock = held_lock(path) if key not in own else None
        if lock is not None:
            reasons.append(f"{rel} is locked by another process ({lock}; qemu holds such locks)")
    mine = f"(pid {own_pid})"
    for rel, holders in sorted(open_for_writing(by_id).items()):
        others = [h for h in holders if not h.endswith(mine)]
        if others:
            reasons.append(f"{rel} is open for writing by {', '.join(others)}")
    return reasons
