"""Which way ``vml commit`` saves a running VM that VML did not start, if any.

(A QEMU that ``vml run`` started from a description is saved by
``live.live_snapshot``, memory as a file; the commit porcelain sees to it.)

- a QEMU reached through a QMP socket (``--qmp``, or one ``vml run`` resumed
  from such a save, which has no description): ``foreign.qmp_snapshot``;
- an active libvirt domain using the area's disks: ``libvirt.libvirt_snapshot``.

Each is a context manager yielding something with ``files`` (area path ->
staged file to read instead) and ``record()`` (the entry's ``vm.live``).
"""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from vml.plumbing.vm.inspect import running_reasons
from vml.plumbing.vm.qemu import vml_vm


class Snapshot(Protocol):
    """A consistent running state, staged for a save."""

    @property
    def files(self) -> dict[str, Path]:
        """Area-relative name -> staged file to read instead."""

    def record(self) -> dict[str, object]:
        """The entry's ``vm.live``."""


#: ``vm.live.via`` values of saves made through something else than ``vml run``.
FOREIGN = ("qmp", "libvirt")


def foreign_source(
    area: Path, *, qmp: Path | None = None, libvirt_uri: str | None = None
) -> AbstractContextManager[Snapshot] | None:
    """The live save of a VM VML did not start that fits ``area`` now, or None.

    ``qmp`` names the QMP socket of a QEMU VML did not start.  A QEMU that
    ``vml run`` runs without a description (resumed from such a save) is
    saved through its socket.  A libvirt domain is looked for
    (``libvirt_uri``, default ``qemu:///system``) when ``libvirt_uri`` is
    given, or ``virsh`` is installed and the area's files look in use (so
    an area at rest costs no call to libvirt).
    """
    # foreign and libvirt are imported only for a VM that runs: a save at
    # rest does not pay for them.
    own = vml_vm(area) if qmp is None else None
    socket = qmp if qmp is not None else own.qmp if own is not None else None
    if socket is not None:
        from vml.plumbing.vm.foreign import qmp_snapshot

        return qmp_snapshot(area, socket)
    if libvirt_uri is None and (shutil.which("virsh") is None or not running_reasons(area)):
        return None
    from vml.plumbing.vm.libvirt import find_domain, libvirt_snapshot

    dom = find_domain(area, libvirt_uri)
    return libvirt_snapshot(area, dom) if dom is not None else None
