"""Time a command and its peak memory; measure sizes on disk.

Peak RSS comes from GNU ``/usr/bin/time -f %M``, which reads the rusage of
the command it waited for: that covers the command and every descendant it
reaped, and ``ru_maxrss`` is the largest resident set of any single process
in that tree. That is the memory a user sees the tool take, including the
helpers it forks (bup and borg spawn subprocesses).

Bytes read (``io=True``, used by the real-guest workload W2) come from
``/proc/PID/io``: ``bench/iowrap.py`` (a small Python program, started with
``-S -I``) runs ``time`` and the command, waits for the whole tree, and
writes the difference of its own counters before and after. When a process
reaps a child, Linux adds the child's I/O counters (and those of the
children *it* reaped) to the parent's, exactly as it does for CPU times, so
the difference is the whole tree's. The wrapper is a child subreaper, so a
descendant that daemonizes is re-parented to it and counted when it ends.
It also times the command itself (its own start-up is not in ``seconds``);
``time`` still reports the peak RSS, of the command's tree only. Two
counters are kept:

* ``rchar``: bytes the tree asked ``read``/``pread``/``readv``,
  ``copy_file_range`` and ``sendfile`` for, whether the page cache served them
  or the disk: what a tool *reads*. Reads through ``mmap``, and ``recv`` on
  sockets, are not in it.
* ``read_bytes``: bytes the tree made the block layer fetch from storage
  (readahead included; page faults of mapped files too). With a warm page
  cache this is near zero, so it is reported but is not the headline.

Why not ``os.wait4`` on our own child: a child forked from this Python
process inherits its memory map until ``exec``, and Linux folds that
pre-exec high-water mark into ``ru_maxrss``, so even ``cp`` would show the
benchmark's own ~50 MiB. ``time`` is a small C program, so what it forks
starts tiny.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TIME = "/usr/bin/time"
"""GNU time (Debian package ``time``), used for the peak RSS of a command tree."""


class CommandError(RuntimeError):
    """A measured command exited non-zero; carries its stderr for the report."""


@dataclass(frozen=True)
class Measurement:
    """Wall time, peak RSS and captured stdout of one command."""

    seconds: float
    peak_rss: int  # bytes
    stdout: str
    # The sync right after the command, timed apart: tools that fsync pay
    # for durability inside ``seconds``, tools that do not (cp) pay it here.
    sync_seconds: float = 0.0
    # /proc/PID/io of the command's tree (``io=True`` only): rchar, read_bytes.
    read_chars: int | None = None
    read_bytes: int | None = None
    # Descendants that daemonized, re-parented to the wrapper and reaped there.
    orphans: int = 0
    orphans_peak_rss: int = 0  # bytes


IOWRAP = Path(__file__).resolve().parent / "iowrap.py"
"""Runs a command and writes its tree's I/O counters and its time (see the module doc)."""


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    io: bool = False,
) -> Measurement:
    """Run ``cmd`` to completion; return its wall time, peak RSS and stdout.

    ``os.sync()`` runs first (untimed) so that dirty pages written by the
    previous step are not flushed on this command's clock, and again after
    it, timed apart in ``sync_seconds``. ``io``: also count the bytes the
    command's tree read (see the module doc).
    """
    os.sync()
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    # Files, not pipes: large outputs (restic --json progress) never block.
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r") as rss,
        tempfile.NamedTemporaryFile("r") as iofile,
    ):
        timed = [TIME, "-f", "%M", "-o", rss.name, *cmd]
        if io:
            timed = [sys.executable, "-S", "-I", str(IOWRAP), iofile.name, *timed]
        start = time.perf_counter()
        proc = subprocess.run(
            timed,
            cwd=cwd,
            env=full_env,
            stdout=out,
            stderr=err,
            check=False,
        )
        seconds = time.perf_counter() - start
        synced = time.perf_counter()
        os.sync()
        sync_seconds = time.perf_counter() - synced
        out.seek(0)
        stdout = out.read().decode(errors="replace")
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise CommandError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
        # On failure time writes a status line first; the number is last.
        peak_kib = int(rss.read().split()[-1])
        counters = json.loads(iofile.read()) if io else {}
        # A daemon the command left (re-parented to the wrapper) is the tool's memory too.
        peak_kib = max(peak_kib, counters.get("orphans_peak_rss_kib", 0))
    if counters.get("orphans_left"):
        raise CommandError(f"{' '.join(cmd)} left {counters['orphans_left']} processes running")
    return Measurement(
        seconds=counters.get("seconds", seconds),
        peak_rss=peak_kib * 1024,
        stdout=stdout,
        sync_seconds=sync_seconds,
        read_chars=counters.get("rchar"),
        read_bytes=counters.get("read_bytes"),
        orphans=counters.get("orphans_reaped", 0),
        orphans_peak_rss=counters.get("orphans_peak_rss_kib", 0) * 1024,
    )


@dataclass(frozen=True)
class DiskUsage:
    """Size of a directory tree: allocated blocks and apparent (logical) bytes."""

    allocated: int
    apparent: int


def disk_usage(path: Path) -> DiskUsage:
    """Return ``du``'s allocated and apparent sizes of ``path`` in bytes.

    Allocated bytes are what the repository really costs on disk (sparse
    copies and holes count as nothing); apparent bytes are reported too so a
    reader can see how much of a repository is holes.
    """
    os.sync()

    def du(*flags: str) -> int:
        out = subprocess.run(
            ["du", "-s", "--block-size=1", *flags, str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return int(out.split()[0])

    return DiskUsage(allocated=du(), apparent=du("--apparent-size"))


def median(values: Sequence[float]) -> float | None:
    """Median of ``values``, or None when there are none (e.g. a single state)."""
    return statistics.median(values) if values else None
