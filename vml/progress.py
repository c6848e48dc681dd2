"""The one progress-callback type of every layer.

Long operations report through a :data:`ProgressFn` the caller passes in
(the CLI draws a bar from it; tests and scripts pass :func:`no_progress`).
Its arguments are ``(phase, done, total)``: ``phase`` names the step
("read", "write", "verify", "pack", "objects", "bytes", ...), ``done`` and
``total`` count bytes or items of that step; ``total`` is 0 when unknown.

A step that learns how much it advanced in increments (bytes of one block)
keeps a :class:`Tally`, whose :meth:`Tally.add` turns them into calls.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]
#: How much a step just advanced (bytes): what :meth:`Tally.add` takes.
Advance = Callable[[int], None]


def no_progress(phase: str, done: int, total: int) -> None:
    """A progress callback that ignores everything."""


class Tally:
    """Sums increments of one phase and reports the running total to a :data:`ProgressFn`."""

    def __init__(self, progress: ProgressFn, phase: str, total: int = 0, done: int = 0) -> None:
        self.progress = progress
        self.phase = phase
        self.total = total
        self.done = done

    def add(self, n: int) -> None:
        """``n`` more done."""
        self.done += n
        self.progress(self.phase, self.done, self.total)
