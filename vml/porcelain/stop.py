"""``vml stop``: power the area's VM off, or save its running state and end QEMU.

- plain: the ACPI power button (QMP ``system_powerdown``); the guest shuts
  down by itself; VML waits for QEMU to end (with raw disks, QEMU pauses
  when the guest is off, VML keeps their dirty ranges, then QEMU quits).
- ``--save``: like a suspend.  QEMU stops the guest, writes its device
  state into ``<name>.vmstate`` (the memory stays in ``<name>.ram``) and
  quits; both files are flushed to disk.  ``vml run`` resumes it; ``vml
  commit`` saves it as an entry that resumes wherever it is checked out.
  Before QEMU quits, the dirty ranges of the raw disks are kept
  (``dirty.keep_at_stop``): QEMU cannot store a raw disk's bitmap, and a
  save at rest then reads only those ranges.
- ``--kill``: end QEMU at once, like pulling the plug.

Both keep the ranges as the keeper does when the guest powers itself off
(``keeper.keep_and_quit``), holding the area lock: the keeper, waiting for
it, then finds QEMU gone, or ranges kept that it leaves as they are.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import AreaError, QMPError, VMControlError
from vml.plumbing.areas import keeper_pid, keeping, lock_area
from vml.plumbing.keeper import keep_and_quit
from vml.plumbing.vm.description import QemuSpec, find_spec
from vml.plumbing.vm.qemu import (
    RunPaths,
    StateHeader,
    current_machine,
    kill,
    now_iso,
    read_run_info,
    save_device_state,
    vml_vm,
    wait_exit,
)
from vml.plumbing.vm.qmp import QMPClient
from vml.porcelain.run import need_spec
from vml.records import Record


@dataclass
class StopResult(Record):
    """What ``vml stop`` did."""

    area: str
    how: str  # "powered off" | "saved" | "killed"
    seconds: float
    state_file: str | None = None
    state_bytes: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. a raw disk's dirty ranges not kept


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(area: Path, spec: QemuSpec, client: QMPClient) -> int:
    """Stop the guest, write its device state beside the memory file, flush both."""
    status = client.execute("query-status").get("status")
    if status == "postmigrate":
        # Left so by an interrupted live save: its disks must be taken back first.
        client.execute("cont")
    client.execute("stop")
    info = read_run_info(area)
    header = StateHeader(
        qemu=str(info.get("qemu", "")),
        machine=current_machine(client),
        arch=spec.arch,
        accel=str(info.get("accel", "tcg")),
        memory_mib=spec.memory_mib,
        ram_file=spec.ram_file,
        saved=now_iso(),
    )
    final = area / spec.state_file
    tmp = final.with_name(final.name + ".tmp")
    try:
        size = save_device_state(client, tmp, header)
        _fsync(tmp)
        _fsync(area / spec.ram_file)
        os.replace(tmp, final)
        _fsync(area)
    except BaseException:
        tmp.unlink(missing_ok=True)
        client.execute("cont")  # not saved: let it run on as before
        raise
    return size


def stop(
    area: Path, *, save: bool = False, force_kill: bool = False, timeout: float = 60.0
) -> StopResult:
    """Stop the VM VML runs for ``area``; see the module doc."""
    t0 = time.monotonic()
    # A QEMU resumed from a --qmp save has no description: it can be powered
    # off or killed, and saved live by `vml commit`, not saved here.
    spec = need_spec(area) if save or find_spec(area) is not None else None
    vm = vml_vm(area)
    if vm is None:
        raise AreaError(f"no VM runs under `vml run` in {area}", "nothing to stop")
    res = StopResult(str(area), "killed" if force_kill else "saved" if save else "powered off", 0)
    # The keeper holds the lock a moment when the guest powered itself off:
    # lock_area waits for it (then QEMU has ended) rather than call the area
    # busy; but pulling the plug waits for nobody (the keeper, its QEMU gone,
    # keeps nothing).
    with contextlib.nullcontext() if force_kill and keeping(area) else lock_area(area):
        if vml_vm(area) is None:  # it ended meanwhile
            if save:
                raise AreaError(
                    f"the VM in {area} powered off by itself: there is no running state to save",
                    "`vml commit` saves it as it is now",
                )
            res.how = "powered off"
            _wait_parent(RunPaths(area))
            res.seconds = time.monotonic() - t0
            return res
        if force_kill:
            kill(vm.pid)
            wait_exit(vm.pid, 10)
        else:
            with QMPClient.connect(vm.qmp) as client:
                if spec is not None and save:
                    res.state_bytes = _save(area, spec, client)
                    res.state_file = spec.state_file
                    # The state is safe; the guest writes no more: what QEMU
                    # alone knows of the raw disks' writes is kept before it quits.
                    res.notes += keep_and_quit(client, area, spec)
                else:
                    res.notes += _powerdown(area, spec, client, timeout)
            if not wait_exit(vm.pid, timeout if not save else 30):
                if save:
                    kill(vm.pid)  # its state is saved; what is left is an exiting QEMU
                    wait_exit(vm.pid, 10)
                else:
                    raise _not_off(area, timeout)
        _wait_parent(RunPaths(area))
    res.seconds = time.monotonic() - t0
    return res


def _powerdown(area: Path, spec: QemuSpec | None, client: QMPClient, timeout: float) -> list[str]:
    """Press the power button; for a VM with raw disks, keep their dirty ranges before QEMU quits.

    QEMU is told to pause, not quit, when the guest powers off (QMP
    ``set-action``; the keeper did so when ``vml run`` started it): the
    guest has written all it will, and QEMU still holds the raw disks'
    bitmaps, read then (``dirty.keep_at_stop``); then ``quit``.  Should this
    process end first, the keeper, once it has the area lock, does the
    rest; without a keeper QEMU stays paused in state ``shutdown``, which
    ``vml stop`` (again) or ``vml stop --kill`` ends.
    """
    status = client.execute("query-status").get("status")
    if status == "shutdown":  # an earlier `vml stop` left it so
        return keep_and_quit(client, area, spec)
    if status != "running":
        raise VMControlError(
            f"the VM in {area} is {status}: a paused guest cannot see the power button",
            "`vml run --continue` continues it (then `vml stop`), or `vml stop --kill` ends it",
        )
    wait = spec is not None and any(d.format == "raw" for d in spec.disks)
    kept = keeper_pid(area) is not None  # it set the action, and undoes it if it dies
    if wait and not kept:
        try:
            client.execute("set-action", {"shutdown": "pause"})
        except QMPError:
            wait = False  # an older QEMU: it quits by itself, its raw bitmaps lost
    client.execute("system_powerdown")
    if not wait:
        return []
    deadline = time.monotonic() + timeout
    try:
        while client.execute("query-status").get("status") != "shutdown":
            if time.monotonic() > deadline:
                raise _not_off(area, timeout)
            time.sleep(0.05)
    except QMPError:
        return []  # QEMU went (crashed?): the caller waits for it; no ranges kept
    except BaseException:
        if not kept:
            with contextlib.suppress(QMPError):  # let it quit on its own again
                client.execute("set-action", {"shutdown": "poweroff"})
        raise
    return keep_and_quit(client, area, spec)


def _not_off(area: Path, timeout: float) -> VMControlError:
    return VMControlError(
        f"the guest in {area} did not power off within {timeout:.0f} s "
        "(it may ignore the ACPI power button, or still be shutting down)",
        "wait and run `vml stop` again, `vml stop --save` to save it as it is, "
        "or `vml stop --kill` to pull the plug",
    )


def _wait_parent(paths: RunPaths, timeout: float = 10.0) -> None:
    """Wait for QEMU's shell parent to record the exit (and drop the memory file)."""
    deadline = time.monotonic() + timeout
    while not paths.exit.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
