"""Durable writes of the small files VML keeps in an area (a VM's description, a resume file).

plumbing/vm may not use the repository's storage code (the layering rule),
so it has this one of its own, the same promise as ``write_atomic``: a
reader sees the old file or the new one, a power loss leaves one of them
(never an empty or cut file), and a failure leaves no temporary behind.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: written to a temporary, fsynced, renamed, folder fsynced.

    The temporary (``.<name>.tmp<pid>``, in the same folder) is removed on
    any failure: an area's files are saved with it.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)
