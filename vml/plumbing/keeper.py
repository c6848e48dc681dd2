"""The dirty-range keeper: a guest that powers itself off keeps its raw disks' dirty ranges.

QEMU holds a raw disk's dirty bitmap only in memory: the ranges it marks
are kept in ``.vml/`` (``dirty.keep_at_stop``) while QEMU still runs and
the guest writes no more.  ``vml stop`` and ``vml stop --save`` do that
before QEMU quits.  A guest that powers itself off (``poweroff`` typed in
it, Shut Down on its desktop) made QEMU quit at once, the bitmaps lost.

So for a VM with raw disks (:func:`wanted`), ``vml run`` starts this keeper
beside QEMU (:func:`start`), on a second QMP socket of QEMU
(``.vml/run/keeper.sock``; the first stays free for vml's commands).  It

1. locks ``.vml/run/keeper.lock`` for as long as it lives (``vml.plumbing.areas.keeper_pid``);
2. tells QEMU to pause, not quit, when the guest powers off (``set-action
   shutdown=pause``) only now that someone is there to end it; a QEMU
   without ``set-action`` (before 6.0) refuses, and the keeper leaves: its
   raw bitmaps are lost at a power-off, as before, and the next save reads
   those disks whole and says so;
3. waits, asleep, for a ``SHUTDOWN`` event after which QEMU is paused in
   ``shutdown``: the guest powered off (or reset under ``-no-reboot``, or a
   panic, or the display window was closed), where QEMU used to quit.  A
   reboot is a ``RESET`` and passes; ``quit`` and signals still end QEMU
   at once (the socket closes and the keeper leaves);
4. takes the area lock (a live save in progress settles its bitmaps
   first; ``vml stop`` holding it keeps the ranges itself), keeps the
   ranges and ends QEMU (:func:`keep_and_quit`, what ``vml stop`` does).

Who ends QEMU when something fails (it must never stay paused for good):

- an error in the keeper: it lets QEMU quit by itself again (``set-action
  shutdown=poweroff``) and ends a QEMU already paused in ``shutdown``
  (:func:`release`);
- the keeper killed, even by SIGKILL: it runs under a small shell
  (``_WATCH``) that then runs :func:`release` in a new process;
- that shell killed too: QEMU, paused in ``shutdown`` once the guest is
  off, shows so in ``vml status``; ``vml stop`` keeps the ranges and ends
  it, ``vml stop --kill`` ends it.

Ranges a keeper killed while keeping did not finish never count: the
bitmap record names kept ranges only once all are written, so the next
save reads the raw disks whole, and says so.

The keeper lives as long as the VM: it runs without ``site`` and imports
only the QMP client while it waits (about 12 MB resident, 6 MB of it its
own); what keeping needs is imported when the guest is off.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from typing import TYPE_CHECKING

from vml.errors import QMPError
from vml.plumbing.vm.qmp import QMPClient

if TYPE_CHECKING:  # (and pathlib: not loaded while the keeper waits)
    from pathlib import Path

    from vml.plumbing.vm.description import QemuSpec

#: Runstates QEMU pauses in, instead of quitting, under ``shutdown=pause``
#: (a panic pauses so only then: the keeper is not started for a VM whose
#: ``qemu_args`` choose ``-action`` or ``-no-shutdown`` themselves).
ENDED = ("shutdown", "guest-panicked")
#: How long the keeper waits for the area lock (a live save being written)
#: before it ends QEMU without keeping the ranges.
LOCK_WAIT = 600.0
#: How long ``vml run`` waits for the keeper to be in place.
READY_WAIT = 30.0

#: Runs the keeper; when it ends other than cleanly (killed, crashed), runs
#: ``release``.  ``$0`` Python, ``$1`` the bootstrap, ``$2`` where ``vml``
#: is, ``$3``-``$5`` area, socket, lock, ``$6`` the log.  The keeper's
#: stdout is the pipe ``vml run`` reads "ready" from; no one else holds it,
#: so a keeper that dies at once reads as the pipe's end.
_WATCH = (
    '( "$0" -S -c "$1" "$2" keep "$3" "$4" "$5" >&3 3>&- & k=$!; exec 3>&-; '
    'wait $k || "$0" -S -c "$1" "$2" release "$3" "$4" "$5" ) '
    '3>&1 >/dev/null 2>>"$6" </dev/null &'
)
#: ``-S``: no ``site`` (a few MB less for the whole run; :func:`_site`).  The
#: package ``vml.plumbing`` is made without running its ``__init__``, which
#: loads git storage (dulwich) for every command: the keeper opens no
#: repository, and while it waits it holds only Python and the QMP client.
_BOOT = (
    "import sys, importlib.util as u; sys.path.append(sys.argv[1]); "
    "s = u.find_spec('vml.plumbing'); sys.modules[s.name] = u.module_from_spec(s); "
    "from vml.plumbing.keeper import main; main(sys.argv[2:])"
)


def wanted(spec: QemuSpec) -> bool:
    """Whether a run of ``spec`` gets a keeper: it has a raw disk, and leaves QEMU's actions to VML."""
    if not any(d.format == "raw" for d in spec.disks):
        return False
    return not any(a.lstrip("-").startswith(("action", "no-shutdown")) for a in spec.qemu_args)


def keep_and_quit(client: QMPClient, area: Path, spec: QemuSpec | None) -> list[str]:
    """Keep the raw disks' dirty ranges of a QEMU whose guest writes no more, then end QEMU.

    The one way QEMU is ended with its ranges kept: ``vml stop`` (after a
    power-off, or ``--save``) and the keeper, each holding the area lock.
    Keeping twice is harmless (``keep_at_stop`` leaves ranges this run
    kept).  Returns what went wrong (the next save then reads whole).
    """
    notes: list[str] = []
    if spec is not None:
        from vml.errors import VMControlError
        from vml.plumbing import dirty

        try:
            notes = dirty.keep_at_stop(client, area, spec)
        except (QMPError, VMControlError, OSError) as e:
            notes = [
                f"the raw disks' dirty ranges were not kept ({e}): the next save reads them whole"
            ]
    with contextlib.suppress(QMPError):  # QEMU may close the socket before it answers
        client.execute("quit")
    return notes


# --- started by `vml run` -----------------------------------------------------------


class Starting:
    """A keeper being started: :meth:`wait` until it is in place."""

    def __init__(self, fd: int, log: Path) -> None:
        self._fd = fd
        self._log = log

    def wait(self, timeout: float = READY_WAIT) -> str | None:
        """None once the keeper is in place; otherwise why the guest's own power-off loses the ranges."""
        import select

        lost = "a power-off from inside the guest will not keep the raw disks' dirty ranges"
        got = b""
        deadline = time.monotonic() + timeout
        try:
            while b"\n" not in got:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                    return f"the dirty-range keeper did not start in {timeout:.0f} s ({self._log}): {lost}"
                chunk = os.read(self._fd, 512)
                if not chunk:
                    return f"the dirty-range keeper ended at once ({self._log}): {lost}"
                got += chunk
        finally:
            self.close()
        word, _, rest = got.decode(errors="replace").partition(" ")
        if word.strip() == "ready":
            return None
        return f"{rest.strip() or word.strip()}: {lost}"

    def close(self) -> None:
        """Stop listening (the keeper goes on)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def start(area: Path) -> Starting:
    """Start the keeper of the VM ``vml run`` is starting for ``area`` (its QEMU listens already).

    Detached (its own session, under ``_WATCH``): it outlives ``vml run``.
    """
    import subprocess
    from pathlib import Path

    import vml
    from vml.plumbing.vm.qemu import RunPaths

    paths = RunPaths(area)
    root = str(Path(vml.__file__).resolve().parent.parent)
    args = [
        str(p.absolute()) for p in (area, paths.keeper_qmp, paths.keeper_lock, paths.keeper_log)
    ]
    r, w = os.pipe()
    try:
        shell = subprocess.Popen(
            ["/bin/sh", "-c", _WATCH, sys.executable, _BOOT, root, *args],
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        shell.wait()  # the outer shell returns at once; the watching one lives on
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return Starting(r, paths.keeper_log)


# --- the keeper process ---------------------------------------------------------------


def main(argv: list[str]) -> None:
    """The keeper process (``keep``) and what runs when it died (``release``): AREA SOCKET LOCK."""
    what, area, sock, lock = argv[:4]
    if what == "keep":
        _keep(area, sock, lock)
    else:
        release(area, sock, lock)


def _say(text: str) -> None:
    """Tell ``vml run`` (the pipe on stdout), then let go of it."""
    with contextlib.suppress(OSError):
        os.write(1, text.encode() + b"\n")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _log(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} keeper: {text}\n".encode())


def _connect(sock: str, timeout: float = 30.0) -> QMPClient:
    """Connect to the keeper's socket; QEMU made it with its first, but allow it a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QMPClient.connect(sock, timeout=timeout)
        except QMPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _claim(lock: str) -> int | None:
    """Lock the keeper's ``lock`` and name this process there (``areas.keeper_pid``); its fd.

    None when another process holds it.  Whoever holds it is the VM's keeper
    for every other command: one that finds the area lock held by it waits
    (``areas.keeping``).
    """
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _keep(area: str, sock: str, lock: str) -> None:
    if _claim(lock) is None:  # held until this process ends
        _say("busy another keeper runs for this VM")
        return
    try:
        client = _connect(sock)
    except QMPError as e:
        _say(f"gone {e}")
        return
    with client:
        try:
            client.execute("set-action", {"shutdown": "pause"})
        except QMPError as e:
            _say(f"old this QEMU cannot pause at a power-off ({e})")
            return
        try:
            _say("ready")
            _watch(client, area)
        except QMPError:
            return  # QEMU ended (quit, killed, crashed): nothing left to keep
        except BaseException:
            _release(client, area)
            raise


def _watch(client: QMPClient, area: str) -> None:
    """Wait until the guest is off (QEMU paused where it used to quit), keep, end QEMU."""
    status = client.execute("query-status").get("status")
    while True:
        while status not in ENDED:
            if client.next_event().get("event") in ("SHUTDOWN", "GUEST_PANICKED"):
                status = client.execute("query-status").get("status")
        _site()
        from pathlib import Path

        from vml.errors import RepositoryBusy
        from vml.plumbing.areas import lock_area
        from vml.plumbing.vm.description import find_spec

        try:
            with lock_area(Path(area), timeout=LOCK_WAIT):
                # Whoever held the lock may have ended QEMU (`vml stop`), or continued it.
                status = client.execute("query-status").get("status")
                if status in ENDED:
                    _log(f"the guest is off ({status}): keeping the raw disks' dirty ranges")
                    for note in keep_and_quit(client, Path(area), find_spec(Path(area))):
                        _log(note)
                    return
        except RepositoryBusy as e:
            _log(f"{e}: QEMU ended without the raw disks' dirty ranges kept")
            client.execute("quit")
            return


def _site() -> None:
    """Add ``site``'s paths, left out while waiting (``-S``): keeping needs xxhash and dulwich."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()


def release(area: str, sock: str, lock: str | None = None) -> None:
    """After the keeper died: let QEMU quit by itself again; end it if it is paused, its guest off.

    ``lock``: the keeper's, taken for the while: this step ends QEMU under
    the area lock as the keeper would, and is waited for as the keeper is.
    """
    fd = _claim(lock) if lock is not None else None
    try:
        try:
            client = QMPClient.connect(sock, timeout=10.0)
        except QMPError:
            return  # QEMU ended too
        with client:
            _release(client, area)
    finally:
        if fd is not None:
            os.close(fd)


def _release(client: QMPClient, area: str) -> None:
    try:
        client.execute("set-action", {"shutdown": "poweroff"})
        if client.execute("query-status").get("status") not in ENDED:
            return
    except QMPError:
        return
    _log("the keeper ended before the guest's dirty ranges were kept: ending QEMU")
    _site()
    from pathlib import Path

    from vml.errors import RepositoryBusy
    from vml.plumbing.areas import lock_area

    try:  # after whoever holds the area lock (a `vml stop` keeping the ranges itself)
        with lock_area(Path(area), timeout=LOCK_WAIT):
            _quit_if_off(client)
            return
    except RepositoryBusy:
        pass
    _quit_if_off(client)


def _quit_if_off(client: QMPClient) -> None:
    with contextlib.suppress(QMPError):
        if client.execute("query-status").get("status") in ENDED:
            client.execute("quit")
