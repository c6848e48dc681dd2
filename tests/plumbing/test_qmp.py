"""The QMP client against a real QEMU (``-machine none`` starts in milliseconds).

A fake server is used only where a real QEMU cannot be made to misbehave:
a peer that never answers, or one that speaks something other than QMP, or
one a killed save left in the middle of a migration.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from vml.errors import QMPError, QMPTimeout, VMControlError
from vml.plumbing.vm.qmp import SUN_PATH_MAX, QMPClient, is_listening, socket_address
from vml.plumbing.vm.rerun import continue_qmp


@pytest.fixture
def qemu_qmp(tmp_path: Path) -> Iterator[Path]:
    """A real qemu-system-x86_64 (no machine, paused) listening on a QMP socket."""
    need("qemu-system-x86_64")
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-nodefaults", "-machine", "none", "-display", "none",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not is_listening(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.01)
        yield sock
    finally:
        proc.kill()
        proc.wait()


def test_greeting_capabilities_and_commands(qemu_qmp: Path) -> None:
    with QMPClient.connect(qemu_qmp) as c:
        assert c.greeting["QMP"]["version"]["qemu"]["major"] >= 2
        assert c.execute("query-status")["status"] == "prelaunch"
        c.execute("cont")
        # cont's RESUME event may come before its return: it is set aside, not taken for it.
        assert c.execute("query-status")["status"] == "running"
        c.execute("stop")
        resumed, stopped = c.wait_event("RESUME", 5), c.wait_event("STOP", 5)
        assert resumed is not None and stopped is not None
        assert resumed["timestamp"]["seconds"] <= stopped["timestamp"]["seconds"]
        assert c.events == [] and c.wait_event("SHUTDOWN", 0.05) is None


def test_a_refused_command_is_a_qmp_error_and_the_session_goes_on(qemu_qmp: Path) -> None:
    with QMPClient.connect(qemu_qmp) as c:
        with pytest.raises(QMPError, match="QEMU refused no-such-command"):
            c.execute("no-such-command")
        assert c.execute("query-status")["status"] == "prelaunch"


def test_file_descriptors_travel_with_getfd(qemu_qmp: Path, tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f, QMPClient.connect(qemu_qmp) as c:
        c.execute("getfd", {"fdname": "x"}, fds=[f.fileno()])
        c.execute("closefd", {"fdname": "x"})
        with pytest.raises(QMPError, match="not found"):
            c.execute("closefd", {"fdname": "x"})


def test_nobody_listening_says_how_to_start_the_vm(tmp_path: Path) -> None:
    assert not is_listening(tmp_path / "none.sock")
    with pytest.raises(QMPError) as e:
        QMPClient.connect(tmp_path / "none.sock", timeout=1)
    assert "cannot connect" in e.value.message and "vml run" in e.value.remedy


def _serve(path: Path, reply: bytes) -> tuple[socket.socket, threading.Thread]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        conn.sendall(reply)
        conn.recv(4096)  # hold the connection; answer nothing more
        time.sleep(1.5)
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def test_a_peer_that_never_answers_times_out(tmp_path: Path) -> None:
    srv, t = _serve(tmp_path / "mute.sock", b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
    try:
        with pytest.raises(QMPTimeout) as e:
            QMPClient.connect(tmp_path / "mute.sock", timeout=0.3)
        assert "did not answer" in e.value.message and "--kill" in e.value.remedy
    finally:
        t.join()
        srv.close()


def test_a_peer_that_is_not_qmp_is_refused(tmp_path: Path) -> None:
    srv, t = _serve(tmp_path / "other.sock", b'{"hello": 1}\n')
    try:
        with pytest.raises(QMPError, match="not a QMP socket"):
            QMPClient.connect(tmp_path / "other.sock", timeout=2)
    finally:
        t.join()
        srv.close()


def test_a_long_socket_path_is_reached_through_its_short_target(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    link = deep / "qmp.sock"
    link.symlink_to(tmp_path / "short.sock")
    assert len(str(link)) > SUN_PATH_MAX
    assert socket_address(link) == str(tmp_path / "short.sock")
    assert socket_address(tmp_path / "short.sock") == str(tmp_path / "short.sock")


def test_a_late_reply_is_never_taken_for_the_next_command(tmp_path: Path) -> None:
    """A command times out; its answer comes late, before the next one's: it is dropped."""
    path = tmp_path / "slow.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    go = threading.Event()

    def run() -> None:
        conn, _ = srv.accept()
        f = conn.makefile("rwb", buffering=0)
        f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        for line in f:
            msg = json.loads(line)
            if msg["execute"] == "query-block":
                go.wait(10)  # answered only after the client gave up on it
                f.write(json.dumps({"return": [], "id": msg["id"]}).encode() + b"\n")
            else:
                f.write(json.dumps({"return": {"running": True}, "id": msg["id"]}).encode() + b"\n")
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        with QMPClient.connect(path, timeout=5) as c:
            with pytest.raises(QMPTimeout):
                c.execute("query-block", timeout=0.2)
            go.set()
            assert c.execute("query-status") == {"running": True}
    finally:
        go.set()
        srv.close()
        t.join(5)


class FakeQEMU:
    """A QMP peer with a scripted migration: what a saver killed mid-migration leaves.

    ``query-migrate`` says ``migration`` until ``migrate_cancel``, then
    ``cancelling`` once and ``cancelled``; ``cont`` is refused while a
    migration runs, as QEMU does.  ``commands`` lists what it was sent.
    Like QEMU, it says a migration ended before its run state leaves
    ``finish-migrate`` (``lag`` more ``query-status`` calls), and refuses
    ``cont`` until then.  ``migrate`` completes at once.
    """

    def __init__(self, path: Path, status: str, migration: str, held: bool, lag: int = 0) -> None:
        self.status, self.migration, self.held, self.lag = status, migration, held, lag
        self.commands: list[tuple[str, object]] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _answer(self, cmd: str, args: dict[str, Any]) -> object:
        if cmd == "query-status":
            status = self.status
            if status == "finish-migrate" and self.migration in ("completed", "cancelled"):
                if self.lag > 0:
                    self.lag -= 1
                else:
                    self.status = "postmigrate"
            return {"status": status, "running": status == "running"}
        if cmd == "migrate":
            self.status, self.migration = "finish-migrate", "completed"
            return {}
        if cmd == "query-migrate":
            if self.migration == "cancelling":
                self.migration = "cancelled"
                return {"status": "cancelling"}
            return {"status": self.migration} if self.migration != "none" else {}
        if cmd == "query-migrate-capabilities":
            return [{"capability": "pause-before-switchover", "state": self.held},
                    {"capability": "events", "state": False}]  # fmt: skip
        if cmd == "migrate_cancel":
            self.migration = "cancelling"
            return {}
        if cmd == "migrate-set-capabilities":
            if self.migration in ("active", "pre-switchover", "cancelling"):
                return {"error": {"class": "GenericError", "desc": "migration in progress"}}
            for c in args["capabilities"]:
                if c["capability"] == "pause-before-switchover":
                    self.held = c["state"]
            return {}
        if cmd == "cont":
            if self.migration in ("active", "pre-switchover", "cancelling"):
                return {"error": {"class": "GenericError", "desc": "migration in progress"}}
            if self.status == "finish-migrate":
                return {
                    "error": {"class": "GenericError", "desc": "Migration is not finalized yet"}
                }
            self.status = "running"
            return {}
        return {}

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                msg = json.loads(line)
                cmd, args = msg["execute"], msg.get("arguments", {})
                self.commands.append((cmd, args))
                out = self._answer(cmd, args)
                reply = out if isinstance(out, dict) and "error" in out else {"return": out}
                reply = {**reply, "id": msg.get("id")}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def close(self) -> None:
        self.srv.close()
        self.thread.join(5)


@pytest.mark.parametrize(
    ("status", "migration"),
    [("finish-migrate", "pre-switchover"), ("paused", "active"), ("running", "active")],
)
def test_continue_ends_a_killed_savers_migration_and_continues(
    tmp_path: Path, status: str, migration: str
) -> None:
    fake = FakeQEMU(tmp_path / "q.sock", status, migration, held=True)
    try:
        assert continue_qmp(tmp_path / "q.sock", timeout=5) is (status == "running")
    finally:
        fake.close()
    sent = [c for c, _ in fake.commands]
    assert "migrate_cancel" in sent
    # The capability goes off once no migration runs, and the guest runs on.
    assert sent.index("migrate-set-capabilities") > sent.index("migrate_cancel")
    assert not fake.held and fake.migration == "cancelled" and fake.status == "running"
    assert sent[-1] == ("cont" if status != "running" else "query-status")


def test_continue_leaves_a_running_guests_own_migration_alone(tmp_path: Path) -> None:
    fake = FakeQEMU(tmp_path / "q.sock", "running", "active", held=False)
    try:
        assert continue_qmp(tmp_path / "q.sock", timeout=5) is True
    finally:
        fake.close()
    assert [c for c, _ in fake.commands if c in ("migrate_cancel", "cont")] == []
    assert fake.migration == "active"


def test_continue_refuses_a_qemu_that_cannot_be_continued(tmp_path: Path) -> None:
    fake = FakeQEMU(tmp_path / "q.sock", "internal-error", "none", held=False)
    try:
        with pytest.raises(VMControlError, match="internal-error"):
            continue_qmp(tmp_path / "q.sock", timeout=5)
    finally:
        fake.close()


def test_a_save_continues_the_guest_only_once_qemu_finalized_its_migration(
    tmp_path: Path,
) -> None:
    # QEMU says "completed" before it leaves finish-migrate: a `cont` sent
    # at once was refused, the guest stayed paused with its disks handed
    # over, and the merge after that failed save: "Block node is read-only".
    from vml.plumbing.vm.qemu import StateHeader, save_device_state

    fake = FakeQEMU(tmp_path / "q.sock", "paused", "none", held=False, lag=3)
    header = StateHeader("7.2.0", "pc", "x86_64", "tcg", 16, "vm.ram", "now")
    try:
        with QMPClient.connect(tmp_path / "q.sock") as c:
            save_device_state(c, tmp_path / "state", header)
            c.execute("cont")  # was: QMPError "Migration is not finalized yet"
    finally:
        fake.close()
    assert fake.status == "running"


def test_continue_waits_for_a_migration_qemu_is_finalizing(tmp_path: Path) -> None:
    fake = FakeQEMU(tmp_path / "q.sock", "finish-migrate", "completed", held=False, lag=3)
    try:
        assert continue_qmp(tmp_path / "q.sock", timeout=5) is False
    finally:
        fake.close()
    assert fake.status == "running"
