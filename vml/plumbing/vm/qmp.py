"""A small QMP client: talk to a running QEMU through its unix socket.

QMP is JSON, one object per line.  On connect QEMU sends a greeting
(``{"QMP": {...}}``); the client must send ``qmp_capabilities`` before any
other command.  Each command gets one reply, ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}``; asynchronous events
(``{"event": ...}``) may arrive at any time, also between a command and its
reply, so they are set aside while waiting.  Only the standard library is
used.  File descriptors (for ``getfd``) travel as ``SCM_RIGHTS`` ancillary
data with the command that needs them.

Errors are ``QMPError`` with a remedy: a socket nobody listens on, a QEMU
that does not answer in time, a command QEMU refuses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from typing import TYPE_CHECKING, Any

from vml.errors import QMPError, QMPTimeout

if TYPE_CHECKING:
    # Names for annotations only: the dirty-range keeper, which lives as long
    # as the VM, imports this module and so pays no memory for them.
    import socket
    from pathlib import Path
    from types import TracebackType

#: Longest path a unix socket address holds on Linux (sun_path, with its NUL).
SUN_PATH_MAX = 107
DEFAULT_TIMEOUT = 10.0


def socket_address(path: str | Path) -> str:
    """The address to connect to ``path``: itself, or its real path if that is shorter.

    A socket VML makes in a deep area may be a symlink to a short path
    (``sun_path`` holds 107 bytes); connecting through the link's own long
    name would fail.
    """
    text = os.fspath(path)
    if len(text.encode()) <= SUN_PATH_MAX:
        return text
    real = os.path.realpath(text)
    if len(real.encode()) <= SUN_PATH_MAX:
        return real
    # Last resort: a relative name from the socket's folder is not possible
    # without chdir (process-wide); say what is wrong instead.
    raise QMPError(
        f"the QMP socket path {text} is longer than {SUN_PATH_MAX} bytes",
        "move the area to a shorter path",
    )


def is_listening(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket ``path``.

    Connecting succeeds as soon as the kernel queues the connection, even
    while QEMU serves another client, so this never waits for QEMU.
    """
    import socket  # only where a VM runs: a save at rest does not import it

    try:
        address = socket_address(path)
    except QMPError:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(address)
    except (BlockingIOError, TimeoutError):
        return True  # its backlog is full: someone listens, and is busy
    except OSError as e:
        return e.errno == errno.EAGAIN
    finally:
        s.close()
    return True


class QMPClient:
    """One QMP session.  Use ``QMPClient.connect(path)``; close it (or use ``with``)."""

    def __init__(self, sock: socket.socket, path: str, greeting: dict[str, Any]) -> None:
        self.sock = sock
        self.path = path
        self.greeting = greeting
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._sent = 0  # commands sent, for their ids

    @classmethod
    def connect(cls, path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> QMPClient:
        """Connect to the QMP socket ``path``, read the greeting, negotiate capabilities.

        QEMU serves one QMP client at a time on a socket: a second client
        waits (up to ``timeout``) until the first one leaves.
        """
        import socket  # only where a VM runs: a save at rest does not import it

        address = socket_address(path)
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(timeout)
                s.connect(address)
                break
            except OSError as e:
                s.close()
                # A full backlog (QEMU serves another client): wait for room.
                busy = isinstance(e, BlockingIOError) or e.errno == errno.EAGAIN
                if busy and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                raise (QMPTimeout if busy else QMPError)(
                    f"cannot connect to QEMU's QMP socket {path}: {e.strerror or e}",
                    "is the VM running? `vml status` says; `vml run` starts it",
                ) from None
        client = cls(s, str(path), {})
        try:
            greeting = client._read_message(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise QMPError(f"{path} is not a QMP socket (no greeting)", "")
            client.greeting = greeting
            client.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        """End the session (QEMU goes on running)."""
        self.sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout(f"QEMU did not answer on {self.path} in time")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            try:
                chunk = self.sock.recv(65536)
            except OSError as e:
                raise QMPError(
                    f"QMP connection to {self.path} failed: {e.strerror or e}", ""
                ) from e
            if not chunk:
                raise QMPError(
                    f"QEMU closed the QMP connection {self.path}",
                    "the VM has stopped; see the area's .vml/run/qemu.log",
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QMPError(f"QEMU sent a malformed QMP message on {self.path}", "") from e
        if not isinstance(msg, dict):
            raise QMPError(f"QEMU sent a malformed QMP message on {self.path}", "")
        return msg

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        fds: list[int] | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        Events that arrive meanwhile are kept in ``events``.  ``fds`` are
        passed along with the command (``getfd``).  Raises ``QMPError`` when
        QEMU answers with an error or not in ``timeout`` seconds.
        """
        import socket

        self._sent += 1
        # QEMU echoes the id: a late reply to an earlier command that timed
        # out is then told apart and dropped, never taken for this one's.
        ident = f"vml-{self._sent}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise QMPError(
                f"cannot send {command} to QEMU on {self.path}: {e.strerror or e}",
                "the VM has stopped; see the area's .vml/run/qemu.log",
            ) from e
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "id" in reply and reply["id"] != ident:
                continue  # the answer to a command that timed out before
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise QMPError(f"QEMU refused {command}: {desc}", "")
            if "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        """Wait for the event ``name`` (or find it among those already seen); None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            try:
                msg = self._read_message(deadline)
            except QMPTimeout:
                return None
            if "event" in msg:
                self.events.append(msg)

    def next_event(self) -> dict[str, Any]:
        """The next event (those set aside while waiting for replies first), however long QEMU lives.

        ``QMPError`` when QEMU closes the connection (it ended).
        """
        if self.events:
            return self.events.pop(0)
        while True:
            with contextlib.suppress(QMPTimeout):  # no deadline: read on
                msg = self._read_message(time.monotonic() + 3600.0)
                if "event" in msg:
                    return msg
