"""Turning porcelain results into terminal output (rich)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from vml.errors import VMLError
from vml.porcelain.common import ProgressFn, no_progress
from vml.porcelain.log import LogEntry, LogResult, human_time

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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


def report_error(e: VMLError) -> None:
    """The one place errors are printed: one line, what happened and what to do."""
    line = f"vml: {e.message}"
    if e.remedy:
        line += f"; {e.remedy}"
    err.print(escape(line), style="red")


@contextmanager
def progress_bar(enabled: bool, what: str) -> Iterator[ProgressFn]:
    """A rich progress bar (bytes, rate, ETA) on a terminal; nothing otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield no_progress
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task(what, total=None)

    def update(phase: str, done: int, total: int) -> None:
        bar.update(task, completed=done, total=total or None, description=f"{what} ({phase})")

    with bar:
        yield update


def _entry_line(le: LogEntry, here: set[str]) -> str:
    parts = [f"[bold]{le.id}[/bold]", f"{le.kind:<12}", human_time(le.created)]
    parts.append(f"stored {size(le.stored_bytes)}")
    if le.labels:
        parts.append("[yellow](" + ", ".join(escape(x) for x in le.labels) + ")[/yellow]")
    if le.message:
        parts.append(escape(le.message.splitlines()[0]))
    if le.id in here or le.areas:
        names = ", ".join(escape(a) for a in le.areas) or "this area"
        parts.append(f"[green]<- you are here: {names}[/green]")
    return "  ".join(parts)


def print_log(result: LogResult, graph: bool, here: set[str]) -> None:
    """Entries newest first, or as trees with ``graph``."""
    if not result.entries:
        out.print("no entries yet; save one with `vml commit`")
        return
    if not graph:
        for le in sorted(result.entries.values(), key=lambda x: _num(x.id), reverse=True):
            parent = f"parent {le.parent}" if le.parent else "no parent"
            out.print(_entry_line(le, here) + f"  [dim]{parent}[/dim]")
        return

    def walk(i: str, prefix: str, last: bool, top: bool) -> None:
        le = result.entries[i]
        branch = "" if top else ("└── " if last else "├── ")
        out.print(escape(prefix + branch) + _entry_line(le, here))
        kids = le.children
        child_prefix = prefix + ("" if top else ("    " if last else "│   "))
        for k, c in enumerate(kids):
            walk(c, child_prefix, k == len(kids) - 1, False)

    for r in result.roots:
        walk(r, "", True, True)


def _num(i: str) -> int:
    return int(i[1:]) if i[:1] == "E" and i[1:].isdigit() else 1 << 62
