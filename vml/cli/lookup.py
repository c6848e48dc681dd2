"""Which repository a command works on: ``--repo``, ``$VML_REPO``, an area's own, the default.

Kept apart from ``common`` so that shell completion (``completion``), which
``common``'s options name, can find the repository too without an import
cycle.
"""

from __future__ import annotations

import os
from pathlib import Path


class _Options:
    """The global options (``vml --repo PATH COMMAND``), set by the root callback."""

    repo: Path | None = None


options = _Options()


def default_repository() -> Path:
    """``$XDG_DATA_HOME/vml``, else ``~/.local/share/vml``."""
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "vml"


def repository_path(area: Path | None, *, explicit: Path | None = None, here: bool = True) -> Path:
    """Where the command's repository is (see ``porcelain.common.find_repository``).

    ``area`` is the area the command works on; with ``here``, the area the
    user stands in (the current folder) is asked next.
    """
    from vml.porcelain.common import find_repository

    areas = [a for a in (area, Path(".") if here else None) if a is not None]
    return find_repository(
        explicit or options.repo, os.environ.get("VML_REPO"), areas, default_repository()
    )
