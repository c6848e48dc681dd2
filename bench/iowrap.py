"""Run a command; write what its whole process tree read, and its time, to a JSON file.

    python -S -I bench/iowrap.py OUT.json CMD [ARG...]

Linux adds a reaped child's I/O counters (``/proc/PID/io``), and those of
the children it reaped, to its parent's; so this process's own counters,
read before the command starts and after every descendant is reaped, differ
by what the tree read. It makes itself a *child subreaper*
(``PR_SET_CHILD_SUBREAPER``): a descendant that daemonizes (``qemu-nbd
--fork``, a double fork) is re-parented here instead of to init, reaped here
when it ends, and counted too. After the command ends, descendants still
running are waited for up to ``GRACE`` seconds, then reported as left over
(their reads so far are not counted).

``seconds`` is from starting the command to reaping it: this wrapper's own
start-up (Python) is not in it. Only the standard library is used, and
``-S -I`` keeps site packages out, so the wrapper starts small.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
GRACE = 10.0


def proc_io() -> tuple[dict[str, int], int]:
    """This process's ``/proc/self/io`` counters, and the bytes this read of them took.

    The kernel prints the counters, then adds the bytes of that very read to
    ``rchar``; the text's length varies with the numbers' digits, so the
    caller must subtract it (two runs of one command once differed by five
    bytes for it).
    """
    fd = os.open("/proc/self/io", os.O_RDONLY)
    try:
        text = b""
        while chunk := os.read(fd, 4096):
            text += chunk
    finally:
        os.close(fd)
    out: dict[str, int] = {}
    for line in text.decode().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out, len(text)


def main(argv: list[str]) -> int:
    """Run ``argv[1:]``, write the counters to ``argv[0]``, exit with the command's status."""
    out, cmd = argv[0], argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    before, read_before = proc_io()
    start = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, dict(os.environ))
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - start
    orphans, orphan_rss, left = 0, 0, 0
    deadline = time.monotonic() + GRACE
    while True:
        try:
            found, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if found:
            orphans += 1
            orphan_rss = max(orphan_rss, usage.ru_maxrss)
        elif time.monotonic() > deadline:
            left = len(_children())
            break
        else:
            time.sleep(0.01)
    after, _ = proc_io()  # printed before its own read was counted
    doc = {
        "seconds": seconds,
        "rchar": after["rchar"] - before["rchar"] - read_before,
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "subreaper": subreaper,
        "orphans_reaped": orphans,
        "orphans_peak_rss_kib": orphan_rss,
        "orphans_left": left,
    }
    with open(out, "w") as f:
        json.dump(doc, f)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell says it


def _children() -> list[str]:
    """Pids of this process's children still running (after the grace period)."""
    me = str(os.getpid())
    kids: list[str] = []
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as f:
                kids += f.read().split()
        except OSError:
            pass
    return kids


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
