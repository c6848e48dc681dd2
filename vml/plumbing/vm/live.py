"""Save a VM that VML runs without shutting it down: pause, copy aside, continue.

``live_snapshot(area)`` is a context manager for a VM under ``vml run``:

1. QMP ``stop`` (QEMU drains and flushes its block layer);
2. ``migrate`` the device state (``x-ignore-shared``: the RAM file is left
   out, ~0.5 MB) to ``<area>/.vml/stage/<pid>/``;
3. copy the memory file and every disk image aside into that stage
   (holes stay holes; a reflink where the file system can);
4. ``cont``: the guest goes on, and the caller reads the copies at leisure.

It yields a ``LiveSnapshot``: ``files`` maps the area-relative name each
copy stands for (``<stem>.ram``, each disk, and ``<stem>.vmstate``, a name
the area itself never holds while the VM runs) to the staged file, and
``pause_seconds`` is how long the guest was stopped.  The VM is continued
on any error, and the stage is removed on exit.  Should the saving process
die while the guest is paused, ``vml run --continue`` continues it (and
``vml status`` says it is paused).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import AreaError, QMPError, VMControlError
from vml.plumbing.vm.description import STATE_SUFFIX, QemuSpec, find_spec
from vml.plumbing.vm.qemu import (
    RunPaths,
    StateHeader,
    copy_sparse,
    current_machine,
    now_iso,
    read_run_info,
    save_device_state,
    vml_vm,
)
from vml.plumbing.vm.qmp import QMPClient


@dataclass
class LiveSnapshot:
    """A consistent copy of a running VM's memory, device state and disks."""

    #: Area-relative name -> staged copy (memory file, disks, device state).
    files: dict[str, Path]
    #: How long the guest was stopped, in seconds.
    pause_seconds: float
    #: What the device state records about the QEMU that saved it.
    header: StateHeader
    #: Bytes of data copied while paused (holes and reflinks cost none).
    copied_bytes: int = 0
    #: Time of each step while paused: stop, device state, copies, cont.
    steps: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, object]:
        """What an entry records of this save (``vm.live`` in its metadata)."""
        h = self.header
        return {
            "pause_seconds": round(self.pause_seconds, 4),
            "state_file": next(p for p in self.files if p.endswith(STATE_SUFFIX)),
            "qemu": h.qemu,
            "machine": h.machine,
            "accel": h.accel,
            "saved": h.saved,
            "steps": {k: round(v, 4) for k, v in self.steps.items()},
            "copied_bytes": self.copied_bytes,
        }


def _disk_files(area: Path, spec: QemuSpec) -> list[str]:
    """Disk images the VM writes (backing files are read-only to QEMU, not copied)."""
    out = []
    for d in spec.disks:
        if not (area / d.path).is_file():
            raise AreaError(f"disk {d.path} of {spec.stem} is missing", "")
        out.append(d.path)
    return out


def _drop_dead_stages(root: Path) -> None:
    """Remove what killed saves left in ``.vml/stage/<pid>/`` (their pid is gone)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if name.isdigit() and not Path(f"/proc/{name}").exists():
            shutil.rmtree(root / name, ignore_errors=True)


def _staged_name(stage: Path, rel: str) -> Path:
    dest = stage / "files" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def _pause_and_copy(
    client: QMPClient, area: Path, spec: QemuSpec, stage: Path
) -> tuple[dict[str, Path], StateHeader, int, dict[str, float]]:
    """Stop, save device state, copy memory and disks aside; the caller continues the VM."""
    info = read_run_info(area)
    to_copy = [spec.ram_file, *_disk_files(area, spec)]
    steps: dict[str, float] = {}
    t = time.monotonic()
    client.execute("stop")
    steps["stop"] = time.monotonic() - t
    header = StateHeader(
        qemu=str(info.get("qemu", "")) or _version(client),
        machine=current_machine(client),
        arch=spec.arch,
        accel=str(info.get("accel", "tcg")),
        memory_mib=spec.memory_mib,
        ram_file=spec.ram_file,
        saved=now_iso(),
    )
    files: dict[str, Path] = {}
    t = time.monotonic()
    state = _staged_name(stage, spec.state_file)
    save_device_state(client, state, header)
    files[spec.state_file] = state
    steps["device_state"] = time.monotonic() - t
    t = time.monotonic()
    copied = 0
    for rel in to_copy:
        dest = _staged_name(stage, rel)
        copied += copy_sparse(area / rel, dest)
        files[rel] = dest
    steps["copy"] = time.monotonic() - t
    return files, header, copied, steps


def _version(client: QMPClient) -> str:
    v = client.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
    return f"{v.get('major', 0)}.{v.get('minor', 0)}.{v.get('micro', 0)}"


@contextlib.contextmanager
def live_snapshot(area: Path, *, timeout: float = 30.0) -> Iterator[LiveSnapshot]:
    """Pause the VM VML runs for ``area``, copy its state aside, continue it; see the module doc.

    The caller holds the area's lock.  Raises ``VMControlError`` when no VM
    runs under ``vml run`` here, or it is paused after an interrupted save
    (``vml run --continue`` first).
    """
    spec = find_spec(area)
    running = vml_vm(area)
    if spec is None or running is None:
        raise VMControlError(f"no VM runs under `vml run` in {area}", "start it with `vml run`")
    paths = RunPaths(area)
    _drop_dead_stages(paths.stage)
    stage = paths.stage / str(os.getpid())
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        with QMPClient.connect(paths.qmp, timeout=timeout) as client:
            status = client.execute("query-status").get("status")
            if status != "running":
                raise VMControlError(
                    f"the VM in {area} is {status}, not running",
                    "`vml run --continue` continues it; then save again",
                )
            t0 = time.monotonic()
            try:
                files, header, copied, steps = _pause_and_copy(client, area, spec, stage)
            finally:
                # Whatever happened, the guest goes on (a QMP failure here is
                # reported, and `vml run --continue` is the way out).
                t = time.monotonic()
                try:
                    client.execute("cont", timeout=timeout)
                except QMPError as e:
                    raise VMControlError(
                        f"the VM in {area} was paused and could not be continued: {e.message}",
                        "run `vml run --continue`",
                    ) from e
                pause = time.monotonic() - t0
            steps["cont"] = time.monotonic() - t
        yield LiveSnapshot(files, pause, header, copied, steps)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            paths.stage.rmdir()  # when no other save uses it
