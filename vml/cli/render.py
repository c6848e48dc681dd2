"""Turning porcelain results into terminal output (rich).

rich is imported only when it draws something: a styled line on a
terminal, a progress bar.  Its console and markup cost ~40 ms of CPU at
start-up, which a command printing JSON (``--json``), nothing (``-q``), or
plain lines (a save's summary, an error or a listing that goes to a file or
a pipe) has no use for.  ``out`` and ``err`` write such lines themselves
(``plain``: what rich would write, to the character); :func:`escape` is
rich's, without rich.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from vml.cli.plain import escape, plain_line
from vml.errors import VMLError
from vml.progress import ProgressFn, no_progress
from vml.records import to_json

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from vml.plumbing.repack import RepackResult
    from vml.porcelain.log import LogEntry, LogResult
    from vml.porcelain.vminfo import EntryVM

# Terminal controls a repository's text must never send: C0 controls but tab and
# newline, DEL, C1 controls (0x9b is a CSI), and the bidi marks that reorder a line.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def harmless(text: str) -> str:
    """``text`` with every terminal control shown as an escape (``\\x1b``), not obeyed."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def _safe_console(stderr: bool) -> Console:
    """A rich console that prints control characters visibly instead of sending them.

    Commit messages, names, paths and remote answers come from other people's
    repositories and folders; an ESC or CSI among them could rewrite the
    screen or the terminal's title.  Every line rich draws passes here, and
    every plain line :meth:`LazyConsole.print` writes itself is made harmless
    the same way, so no caller has to remember it (rich markup in such text
    is escaped where it is written into a line, with :func:`escape`; emoji
    codes such as ``:bug:`` are never replaced, so a message prints as it
    was typed).
    """
    from rich.console import Console

    class SafeConsole(Console):
        def print(self, *objects: Any, **kwargs: Any) -> None:
            """Print like rich, with control characters in text made harmless."""
            super().print(*(harmless(o) if isinstance(o, str) else o for o in objects), **kwargs)

    return SafeConsole(stderr=stderr, highlight=False, soft_wrap=True, emoji=False)


class LazyConsole:
    """``out`` or ``err``: the safe rich console, made when something is first printed.

    ``quiet`` is kept here (``-q``, ``--json``): a quiet console prints
    nothing, as rich's does, without building one.
    """

    def __init__(self, stderr: bool = False) -> None:
        self.stderr = stderr
        self.quiet = False
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The rich console itself (for a progress bar), made now if need be."""
        if self._console is None:
            self._console = _safe_console(self.stderr)
        self._console.quiet = self.quiet
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Print like rich's ``Console.print`` (nothing when quiet); plain text without rich."""
        if self.quiet:
            return
        stream = sys.stderr if self.stderr else sys.stdout
        safe = tuple(harmless(o) if isinstance(o, str) else o for o in objects)
        # Under a live progress bar rich owns the stream (it replaced sys.stdout).
        line = None if hasattr(stream, "rich_proxied_file") else plain_line(safe, kwargs, stream)
        if line is None:
            self.console.print(*safe, **kwargs)
            return
        try:
            stream.write(line)
            stream.flush()
        except BrokenPipeError:
            # What rich's Console.on_broken_pipe does: `vml log | head` ends quietly, code 1.
            self.quiet = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None


out = LazyConsole()
err = LazyConsole(stderr=True)


def size(n: int | None) -> str:
    """Bytes in binary units: ``1.5 MiB``."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def print_repack(r: RepackResult) -> None:
    """The line saying that small packs were rolled up."""
    out.print(
        f"packed {len(r.merged)} small packs into {len(r.new_packs)} "
        f"({size(r.written_bytes)}); {r.packs_after} packs in the repository"
    )


def emit_json(value: object) -> None:
    """Print a ``--json`` document: ``value``'s JSON form (``docs/JSON.md``), on stdout."""
    sys.stdout.write(json.dumps(to_json(value), indent=1) + "\n")


def report_error(e: VMLError) -> None:
    """The one place errors are printed: one line, what happened and what to do."""
    line = f"vml: {e.message}"
    if e.remedy:
        line += f"; {e.remedy}"
    err.print(escape(line), style="red")


class _Collect(logging.Handler):
    """Keeps each distinct warning the lower layers log, in order."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line not in self.lines:
            self.lines.append(line)


class _SayNow(logging.Handler):
    """Prints what it is given at once, on stderr (a wait for another command's lock)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]vml:[/yellow] {escape(record.getMessage())}")


@contextmanager
def warnings_said_once() -> Iterator[None]:
    """Print what plumbing warned about (a pack set aside, a damaged cache), once each.

    Printed when the command succeeded: a failed command prints its one
    error line only (an error caused by the same damage names it).
    """
    # dulwich logs what it passes over (a ref to a missing object in a
    # repository it serves): VML reports the consequences itself.
    dulwich_log = logging.getLogger("dulwich")
    if not dulwich_log.handlers:
        dulwich_log.addHandler(logging.NullHandler())
        dulwich_log.propagate = False
    logger = logging.getLogger("vml")
    handler = _Collect()
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    # A wait for a lock is said as it starts, not at the end: it may last minutes.
    waits = logging.getLogger("vml.wait")
    now = _SayNow()
    waits.addHandler(now)
    waits_propagate, waits.propagate = waits.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        waits.removeHandler(now)
        waits.propagate = waits_propagate
    for line in handler.lines:
        err.print(f"[yellow]vml: warning:[/yellow] {escape(line)}")


@contextmanager
def only_errors(on: bool) -> Iterator[None]:
    """With ``on`` (``-q``, ``--json``), print nothing but errors, warnings and JSON.

    ``out`` falls silent and no progress bar is drawn; ``err`` still speaks.
    """
    before = out.quiet
    out.quiet = on or before
    try:
        yield
    finally:
        out.quiet = before


def bars_wanted() -> bool:
    """Draw progress bars: on a terminal, unless ``-q`` or ``--json`` silenced ``out``."""
    return not out.quiet and sys.stderr.isatty()


#: Seconds a command works before its bar is drawn: a shorter one would only flash
#: (the bar is transient), and drawing it costs rich's import, ~80 ms of CPU.
BAR_AFTER = 0.5


@contextmanager
def progress_bar(what: str) -> Iterator[ProgressFn]:
    """A rich progress bar (bytes, rate, ETA) on a terminal, once :data:`BAR_AFTER` has passed.

    Nothing otherwise: off a terminal, under ``-q``, or for a command done sooner.
    """
    if not bars_wanted():
        yield no_progress
        return
    start = time.monotonic()
    lock = threading.Lock()
    drawn: list[tuple[Progress, TaskID]] = []

    def update(phase: str, done: int, total: int) -> None:
        if not drawn:
            if time.monotonic() - start < BAR_AFTER:
                return
            with lock:  # progress may come from the pool's threads
                if not drawn:
                    drawn.append(_draw_bar(what))
        bar, task = drawn[0]
        bar.update(task, completed=done, total=total or None, description=f"{what} ({phase})")

    try:
        yield update
    finally:
        if drawn:
            drawn[0][0].stop()


def _draw_bar(what: str) -> tuple[Progress, TaskID]:
    """Start a transient bar for ``what`` on ``err`` (stopped by :func:`progress_bar`)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err.console,
        transient=True,
    )
    task = bar.add_task(what, total=None)
    bar.start()
    return bar, task


def vm_brief(vm: EntryVM | None) -> str:
    """The VM in a few words for one-line listings: ``vmware "Ubuntu" suspended``."""
    if vm is None or not vm.known:
        return ""
    parts = [vm.info.hypervisor]
    if vm.info.name:
        parts.append(f'"{vm.info.name}"')
    parts.append(_power(vm, brief=True))
    return " ".join(parts)


def saved_state(vm: EntryVM | None) -> str:
    """How an entry holds its VM, in words: ``saved running, consistent``; '' if unknown."""
    if vm is None or not vm.known:
        return ""
    if vm.crash_consistent:
        return "saved running, crash-consistent"
    if vm.live is not None:
        via = f" through {vm.live.via}" if vm.live.via != "vml run" else ""
        return f"saved running{via}, consistent"
    return f"saved {vm.info.power_state}"


def _power(vm: EntryVM, *, brief: bool) -> str:
    """How the VM was (saved) running: off, suspended, crash-consistent, live, under vml run.

    Plain text with ``brief`` (one-line listings), else rich markup.
    """
    run, live = vm.vml_run, vm.live
    if vm.crash_consistent:
        return (
            "running, crash-consistent"
            if brief
            else "[red]running when saved: crash-consistent[/red]"
        )
    if live is not None:
        if brief:
            return "running, consistent"
        via = f" through {live.via}" if live.via != "vml run" else ""
        return f"running when saved: consistent (saved live{via}, paused {live.pause_seconds} s)"
    if brief:  # plain text: the caller escapes the whole brief
        return f"{run.state} under vml run" if run is not None else vm.info.power_state
    if run is not None and run.state in ("paused", "postmigrate"):
        return (
            f"[yellow]paused under `vml run` (QEMU pid {run.pid}): "
            "`vml run --continue` continues it[/yellow]"
        )
    from vml.plumbing.keeper import ENDED

    if run is not None and run.state in ENDED:
        return (
            f"[yellow]off; QEMU waits under `vml run` (pid {run.pid}) while the raw disks' "
            "dirty ranges are kept: should it stay, `vml stop` ends it[/yellow]"
        )
    if run is not None:
        return f"{escape(run.state)} under `vml run` (QEMU pid {run.pid})"
    return escape(vm.info.power_state)


def vm_lines(vm: EntryVM | None, label: str = "vm") -> list[str]:
    """The VM in detail (``show``, ``status``): one line for the VM, one per disk.

    Returns rich markup, user text escaped; empty when there is no VM.
    """
    if vm is None or not vm.known:
        return []
    info = vm.info
    head = [escape(info.hypervisor)]
    if info.name:
        head.append(escape(f'"{info.name}"'))
    if info.guest_os:
        head.append(f"guest {escape(info.guest_os)}")
    if info.memory_mib is not None:
        head.append(f"memory {size(info.memory_mib << 20)}")
    head.append(_power(vm, brief=False))
    lines = [f"{label:<9} " + ", ".join(head)]
    for d in info.disks:
        text = f"  disk    {escape(d.path)}  {escape(d.format)}  {size(d.virtual_size)} virtual"
        if d.backing:
            text += f", backing {escape(d.backing)}"
        lines.append(text)
    for e in vm.external_files:
        lines.append(f"  outside {escape(e.source)} saved as {escape(e.path)}")
    return lines


def _entry_line(le: LogEntry, here: set[str]) -> str:
    from vml.porcelain.log import human_time

    if le.damage is not None:
        # Only what is known: the rest of the log goes on.
        parts = [f"[bold]{le.id}[/bold]", f"[red]damaged: {escape(le.damage)}[/red]"]
        if le.labels:
            parts.append("[yellow](" + ", ".join(escape(x) for x in le.labels) + ")[/yellow]")
        return "  ".join(parts)
    parts = [f"[bold]{le.id}[/bold]", f"{le.kind:<12}", escape(human_time(le.created))]
    parts.append(f"stored {size(le.stored_bytes)}")
    brief = vm_brief(le.vm)
    if brief:
        style = "red" if le.vm and le.vm.crash_consistent else "cyan"
        parts.append(f"[{style}]{escape(brief)}[/{style}]")
    if le.labels:
        parts.append("[yellow](" + ", ".join(escape(x) for x in le.labels) + ")[/yellow]")
    if le.message:
        parts.append(escape(le.message.splitlines()[0]))
    if le.remote:
        parts.append(f"[magenta]from {escape(le.remote)}[/magenta]")
    if le.rewritten:
        parts.append(f"[dim]({escape(le.rewritten[-1])})[/dim]")
    if le.id in here or le.areas:
        names = ", ".join(escape(a) for a in le.areas) or "this area"
        parts.append(f"[green]<- you are here: {names}[/green]")
    return "  ".join(parts)


def print_log(result: LogResult, graph: bool, here: set[str], cut: bool = False) -> None:
    """Entries newest first, or as trees with ``graph``.

    ``cut``: only some entries are listed (``-n``); a tree drawn from an
    entry whose parent is left out says which parent that is.
    """
    if not result.entries:
        out.print("no entries yet; save one with `vml commit`")
        return
    # Lines go to rich in batches: a call per line cost ~0.5 ms (options, terminal
    # size, render pipeline), most of a long log's time.  Each line closes its
    # own markup, so a batch prints what its lines would one by one.
    batch: list[str] = []
    for line in _log_lines(result, graph, here, cut):
        batch.append(line)
        if len(batch) == _BATCH:
            out.print("\n".join(batch))
            batch = []
    if batch:
        out.print("\n".join(batch))


_BATCH = 256


def _log_lines(result: LogResult, graph: bool, here: set[str], cut: bool) -> Iterator[str]:
    """The lines of :func:`print_log`, rich markup, user text escaped."""
    if not graph:
        for le in sorted(result.entries.values(), key=lambda x: _num(x.id), reverse=True):
            parent = f"parent {le.parent}" if le.parent else "no parent"
            if le.damage is not None and not le.parent:
                parent = "parent unknown"
            yield _entry_line(le, here) + f"  [dim]{parent}[/dim]"
        return
    # Depth first, each entry before its children, without recursion: a chain
    # of thousands of entries is as deep as Python's recursion limit allows.
    stack: list[tuple[str, str, bool, bool]] = [(r, "", True, True) for r in reversed(result.roots)]
    while stack:
        i, prefix, last, top = stack.pop()
        le = result.entries[i]
        branch = "" if top else ("└── " if last else "├── ")
        below = f"  [dim]parent {le.parent}[/dim]" if cut and top and le.parent else ""
        yield escape(prefix + branch) + _entry_line(le, here) + below
        kids = le.children
        child_prefix = prefix + ("" if top else ("    " if last else "│   "))
        stack.extend(
            (c, child_prefix, k == len(kids) - 1, False) for k, c in reversed(list(enumerate(kids)))
        )


def _num(i: str) -> int:
    return int(i[1:]) if i[:1] == "E" and i[1:].isdigit() else 1 << 62
