"""The keeper's way out: an older QEMU, and ``release`` after a keeper died (``vml.plumbing.keeper``).

A real QEMU (``-machine none``, ``-no-reboot``: a ``system_reset`` is then
a shutdown, which ``shutdown=pause`` pauses) where one can be; a fake QMP
peer for a QEMU older than ``set-action`` (6.0).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import need
from tests.plumbing.test_qemu_vm import SPEC
from vml.plumbing import keeper
from vml.plumbing.areas import keeper_pid, lock_area
from vml.plumbing.vm.description import QemuDisk
from vml.plumbing.vm.qemu import RunPaths
from vml.plumbing.vm.qmp import QMPClient, is_listening

WAIT = 30.0


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """An area folder, and a real QEMU on its keeper socket, told to pause at a shutdown as the keeper does."""
    need("qemu-system-x86_64")
    area = tmp_path / "lab"
    sock = RunPaths(area).keeper_qmp
    sock.parent.mkdir(parents=True)
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-machine", "none", "-display", "none",
         "-no-reboot", "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        while not is_listening(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.01)
        with QMPClient.connect(sock) as c:
            c.execute("set-action", {"shutdown": "pause"})
        yield area, sock, proc
    finally:
        proc.kill()
        proc.wait()


def test_release_ends_a_qemu_paused_with_its_guest_off(
    qemu: tuple[Path, Path, subprocess.Popen[bytes]],
) -> None:
    area, sock, proc = qemu
    with QMPClient.connect(sock) as c:
        c.execute("system_reset")  # under -no-reboot: a shutdown, paused
        assert c.wait_event("SHUTDOWN", WAIT) is not None
    keeper.release(str(area), str(sock))
    assert proc.wait(WAIT) == 0


def test_release_lets_a_running_qemu_quit_by_itself_again(
    qemu: tuple[Path, Path, subprocess.Popen[bytes]],
) -> None:
    area, sock, proc = qemu
    keeper.release(str(area), str(sock))
    assert proc.poll() is None  # running: left running
    with QMPClient.connect(sock) as c:
        c.execute("system_reset")  # now QEMU quits, as it did before the keeper
    assert proc.wait(WAIT) == 0


def _old_qemu(path: Path, seen: list[str]) -> tuple[socket.socket, threading.Thread]:
    """A QMP peer like a QEMU before 6.0: no ``set-action``.  Records the commands until closed."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        buf = b""
        while chunk := conn.recv(4096):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                seen.append(msg["execute"])
                if msg["execute"] == "set-action":
                    err = {
                        "class": "CommandNotFound",
                        "desc": "The command set-action has not been found",
                    }
                    reply = {"error": err, "id": msg["id"]}
                else:
                    reply = {"return": {}, "id": msg["id"]}
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_an_older_qemu_gets_no_keeper_and_is_told_so(tmp_path: Path) -> None:
    """The keeper leaves at once (QEMU is never told to pause); ``vml run`` notes why."""
    area = tmp_path / "lab"
    RunPaths(area).dir.mkdir(parents=True)
    seen: list[str] = []
    srv, t = _old_qemu(RunPaths(area).keeper_qmp, seen)
    try:
        why = keeper.start(area).wait()
        t.join(WAIT)
        assert not t.is_alive()  # the keeper closed the connection
    finally:
        srv.close()
    assert why is not None and "cannot pause at a power-off" in why
    assert "will not keep the raw disks' dirty ranges" in why
    assert seen == ["qmp_capabilities", "set-action"]


def test_a_keeper_for_raw_disks_unless_the_description_chooses_qemus_actions() -> None:
    assert keeper.wanted(SPEC)  # a qcow2 and a raw disk
    assert not keeper.wanted(replace(SPEC, disks=(QemuDisk("root.qcow2", "qcow2"),)))
    for args in (["-action", "panic=pause"], ["--action=shutdown=pause"], ["-no-shutdown"]):
        assert not keeper.wanted(replace(SPEC, qemu_args=(*SPEC.qemu_args, *args)))
    assert keeper.wanted(replace(SPEC, qemu_args=("-no-reboot",)))


def test_release_is_the_keeper_while_it_works(
    qemu: tuple[Path, Path, subprocess.Popen[bytes]],
) -> None:
    """The step run after the keeper died ends QEMU under the area lock: it holds the keeper's
    lock meanwhile, so a command finding the area held by it waits for it as for the keeper."""
    area, sock, proc = qemu
    with QMPClient.connect(sock) as c:
        c.execute("system_reset")  # under -no-reboot: a shutdown, paused
        assert c.wait_event("SHUTDOWN", WAIT) is not None
    lock = RunPaths(area).keeper_lock
    done = threading.Event()
    with lock_area(area):  # `release` waits for it
        t = threading.Thread(
            target=lambda: (keeper.release(str(area), str(sock), str(lock)), done.set())
        )
        t.start()
        deadline = time.monotonic() + WAIT
        while keeper_pid(area) is None:
            assert time.monotonic() < deadline and not done.is_set(), "release took no lock"
            time.sleep(0.01)
        assert keeper_pid(area) == os.getpid() and proc.poll() is None
    t.join(WAIT)
    assert done.is_set() and proc.wait(WAIT) == 0
    assert keeper_pid(area) is None  # let go with its work
