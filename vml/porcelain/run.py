"""``vml run``: start the area's QEMU VM (or resume its saved running state).

The VM is described by the area's ``<name>.qemu.json`` (``vml vm init``) or
a libvirt domain XML; the command line comes from
``vml.plumbing.vm.qemu.build_command``.  With a saved running state
(``<name>.vmstate`` next to the memory file: from ``vml stop --save``, or
an entry saved while the VM ran) QEMU starts with ``-incoming defer``, loads
it and continues: the guest goes on where it was.  The state is then
consumed (removed), so it can never be resumed twice against disks that
have moved on.  A state saved through a QEMU's own QMP socket or through
libvirt (``<stem>.resume.json``, ``vml.plumbing.vm.resume``) resumes with
that QEMU's command line again, or with ``virsh restore``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import AreaError, IncompatibleState, QMPError, VMControlError, VMRunning
from vml.plumbing import dirty, keeper
from vml.plumbing.areas import lock_area
from vml.plumbing.vm.bitmaps import drop_records
from vml.plumbing.vm.description import QemuSpec, find_spec
from vml.plumbing.vm.inspect import running_reasons
from vml.plumbing.vm.libvirt import SYSTEM_URI, restore_command, resume_domain
from vml.plumbing.vm.qemu import (
    PAUSED,
    QemuBuild,
    RunPaths,
    build_command,
    check_loadable,
    kvm_usable,
    launch_detached,
    load_device_state,
    note_closed,
    now_iso,
    prepare_run_dir,
    qemu_build,
    read_state_header,
    set_capabilities,
    vml_vm,
    wait_for_qmp,
    write_run_info,
)
from vml.plumbing.vm.qmp import QMPClient
from vml.plumbing.vm.rerun import (
    check_qemu,
    check_restore_xml,
    continue_qmp,
    restored_xml,
    resume_command,
    resume_qmp,
)
from vml.plumbing.vm.resume import discard, find_resume, read_resume
from vml.records import Record

ACCELS = ("kvm", "tcg")


@dataclass
class RunResult(Record):
    """What ``vml run`` did."""

    area: str
    command: list[str]
    accel: str
    machine: str
    resumed: bool = False  # a saved running state was loaded
    continued: bool = False  # --continue of a paused VM
    already_running: bool = False
    pid: int | None = None
    console_log: str = ""
    seconds: float = 0.0
    dry_run: bool = False
    exit_status: int | None = None  # --console: QEMU's exit status
    notes: list[str] = field(default_factory=list)
    domain: str | None = None  # resumed through libvirt: the domain's name


def need_spec(area: Path) -> QemuSpec:
    """The area's VM description, or ``AreaError`` saying how to write one."""
    if not area.is_dir():
        raise AreaError(f"no working area at {area}", "check the path")
    spec = find_spec(area)
    if spec is None:
        raise AreaError(
            f"the area {area} has no QEMU VM description",
            f"write one with `vml vm init {area} --disk FILE`",
        )
    return spec


def _continue(area: Path, qmp: Path | None) -> RunResult:
    """``cont`` the VM VML runs for ``area`` (or the QEMU on ``qmp``) if it is paused."""
    if qmp is not None:
        res = RunResult(str(area), [], "", "", continued=True)
        res.already_running = continue_qmp(qmp)
        return res
    vm = vml_vm(area)
    if vm is None:
        raise AreaError(f"no VM runs under `vml run` in {area}", "start it with `vml run`")
    res = RunResult(str(area), [], "", "", continued=True, pid=vm.pid)
    res.console_log = str(RunPaths(area).console)
    with QMPClient.connect(vm.qmp) as c:
        status = str(c.execute("query-status").get("status"))
        if status == "running":
            res.already_running = True
        elif status in PAUSED:
            c.execute("cont")
        else:
            raise VMControlError(
                f"the VM in {area} is {status} and cannot be continued",
                "`vml stop --kill` ends it; `vml run` starts it again",
            )
    return res


def _resume_foreign(
    area: Path, rel: str, dry_run: bool, libvirt_uri: str | None, t0: float
) -> RunResult:
    """Resume a running state saved through QMP (QEMU again) or libvirt (``virsh restore``)."""
    info = read_resume(area, rel)
    if not (area / info.state).is_file():
        raise IncompatibleState(
            f"{rel} names the saved state {info.state}, which is missing from {area}",
            f"check the entry out again, or remove {rel} to start afresh",
        )
    if info.via == "qmp":
        cmd = resume_command(area, info)
    else:
        cmd = restore_command(area, info, libvirt_uri or SYSTEM_URI)
    res = RunResult(str(area), cmd, info.accel, info.machine, resumed=True)
    res.domain = info.domain or None
    if dry_run:
        res.dry_run = True
        return res
    _refuse_running(area)
    if info.via == "qmp":
        cmd[0] = check_qemu(info, cmd[0], area, rel)  # the QEMU checked is the one run
    with lock_area(area):
        _refuse_running(area)
        if info.via == "qmp":
            resume_qmp(area, rel, info, cmd)
            vm = vml_vm(area)
            res.pid = vm.pid if vm is not None else None
            res.console_log = str(RunPaths(area).log)
        else:
            check_restore_xml(area, restored_xml(area, info, libvirt_uri or SYSTEM_URI))
            resume_domain(area, rel, info, libvirt_uri)
    res.notes.append(f"resumed from the saved running state {info.state} (now consumed)")
    res.seconds = time.monotonic() - t0
    return res


def _check_files(area: Path, spec: QemuSpec) -> None:
    missing = [p for p in spec.files() if not (area / p).is_file()]
    if missing:
        raise AreaError(
            f"the VM {spec.name} needs {', '.join(missing)}, missing from {area}",
            "put them back, or describe the VM again with `vml vm init --force`",
        )


def _plan(
    area: Path, spec: QemuSpec, build: QemuBuild, accel: str | None, discard_state: bool
) -> tuple[str, str, int | None]:
    """Accelerator, machine type, and the offset of a saved state to resume (or None)."""
    state = area / spec.state_file
    if discard_state:
        state.unlink(missing_ok=True)
        (area / spec.ram_file).unlink(missing_ok=True)
    if state.exists():
        header, offset = read_state_header(state)
        chosen = accel or header.accel
        check_loadable(header, spec, build, chosen)
        ram = area / spec.ram_file
        if not ram.is_file() or ram.stat().st_size != spec.memory_mib << 20:
            raise IncompatibleState(
                f"the saved state of {spec.stem} needs its memory file {spec.ram_file} "
                f"({spec.memory_mib} MiB), which is missing or of another size",
                "check the entry out again, or boot afresh with `vml run --discard-state`",
            )
        return chosen, header.machine, offset
    chosen = accel or ("kvm" if kvm_usable() else "tcg")
    machine = build.resolve_machine(spec.machine)
    if machine is None:
        raise AreaError(
            f"QEMU {build.version} has no machine type {spec.machine!r} ({spec.source})",
            f"choose one that `{build.binary} -machine help` lists",
        )
    return chosen, machine, None


def _fresh_ram(area: Path, spec: QemuSpec) -> None:
    """A new, empty (sparse) memory file: a booting guest owes nothing to old memory."""
    ram = area / spec.ram_file
    ram.unlink(missing_ok=True)
    with open(ram, "wb") as f:
        f.truncate(spec.memory_mib << 20)


def _start(
    client: QMPClient,
    area: Path,
    spec: QemuSpec,
    offset: int | None,
    res: RunResult,
    plan: dirty.StartPlan,
    starting: keeper.Starting | None,
) -> None:
    set_capabilities(client)
    if offset is not None:
        try:
            load_device_state(client, area / spec.state_file, offset)
        except VMControlError as e:
            raise IncompatibleState(
                f"QEMU could not load the saved state of {spec.stem}: {e.message}",
                "boot afresh with `vml run --discard-state` (the state is kept until then)",
            ) from e
    try:
        # Before the guest runs, so that every write it makes is recorded.
        dirty.start_bitmaps(client, area, spec, plan)
    except (QMPError, OSError) as e:
        drop_records(area)
        res.notes.append(f"the disks' dirty bitmaps were not started ({e}): saves read them whole")
    if starting is not None:
        # In place before the guest runs, so that a power-off at any time finds it.
        why = starting.wait()
        if why is not None:
            res.notes.append(why)
    client.execute("cont")
    if offset is not None:
        # Running on: the saved state no longer matches the disks.
        (area / spec.state_file).unlink(missing_ok=True)
        res.resumed = True


def _refuse_running(area: Path) -> None:
    vm = vml_vm(area)
    if vm is not None:
        raise VMRunning(
            f"the VM in {area} already runs under `vml run` (QEMU pid {vm.pid})",
            "`vml stop` stops it; `vml run --continue` continues it if it is paused",
        )
    reasons = running_reasons(area)
    if reasons:
        raise VMRunning(
            f"the VM in {area} looks running elsewhere: " + "; ".join(reasons),
            "stop it where it runs first",
        )


def run(
    area: Path,
    *,
    accel: str | None = None,
    dry_run: bool = False,
    console: bool = False,
    cont: bool = False,
    discard_state: bool = False,
    on_console: Callable[[RunResult], None] | None = None,
    qmp: Path | None = None,
    libvirt_uri: str | None = None,
) -> RunResult:
    """Start (or resume, or ``cont``inue) the VM of ``area``; see the module doc.

    An area holding a running state saved through QMP or libvirt
    (``<stem>.resume.json``) resumes that way instead.  ``qmp`` with
    ``cont``: continue the QEMU on that socket (after a killed ``--qmp`` save).

    Returns once the guest runs; with ``console`` only when QEMU has ended
    (``on_console`` is called just before the terminal is handed over).
    """
    t0 = time.monotonic()
    if accel is not None and accel not in ACCELS:
        raise AreaError(f"unknown accelerator {accel!r}", "use --accel kvm or --accel tcg")
    if cont:
        return _continue(area, qmp)
    saved = find_resume(area) if area.is_dir() else None
    if saved is not None and not (discard_state and not dry_run):
        return _resume_foreign(area, saved, dry_run, libvirt_uri, t0)
    spec = need_spec(area)
    if saved is not None:  # --discard-state: boot from the description instead
        discard(area, saved)
    if not dry_run:
        _refuse_running(area)
    _check_files(area, spec)
    build = qemu_build(spec.arch)
    chosen, machine, offset = _plan(area, spec, build, accel, discard_state and not dry_run)
    cmd = build_command(
        area,
        spec,
        build,
        accel=chosen,
        machine=machine,
        console=console,
        incoming=offset is not None,
        keeper=keeper.wanted(spec),
    )
    paths = RunPaths(area)
    res = RunResult(str(area), cmd, chosen, machine, console_log=str(paths.console))
    if dry_run:
        res.dry_run = True
        res.resumed = offset is not None
        return res
    proc = _launch(area, spec, build, offset, res, console)
    if res.resumed:
        res.notes.append("resumed from the saved running state (now consumed)")
    if proc is not None:
        res.pid = proc.pid
        if on_console is not None:
            on_console(res)
        try:
            res.exit_status = proc.wait()
        finally:
            _ended(area, spec, proc)
    else:
        vm = vml_vm(area)
        res.pid = vm.pid if vm is not None else None
    res.seconds = time.monotonic() - t0
    return res


def _launch(
    area: Path,
    spec: QemuSpec,
    build: QemuBuild,
    offset: int | None,
    res: RunResult,
    console: bool,
) -> subprocess.Popen[bytes] | None:
    """Start QEMU (in the background, or as a child with the console) and let the guest run.

    Returns the foreground child, or None for a detached QEMU.  On any error
    QEMU is ended again (a saved state stays for another try).  A VM with
    raw disks gets the dirty-range keeper (``keeper``), started as soon as
    QEMU listens (Python's start overlaps the set-up) and in place before
    the guest runs.
    """
    paths = RunPaths(area)
    proc: subprocess.Popen[bytes] | None = None
    keep = keeper.wanted(spec)
    starting: keeper.Starting | None = None
    with lock_area(area):
        _refuse_running(area)  # again, now that no other vml command can start it
        # What the disks' dirty bitmaps may count from, before QEMU touches them.
        plan = dirty.start_plan(area, spec)
        prepare_run_dir(area, keeper=keep)
        if offset is None:
            _fresh_ram(area, spec)
        write_run_info(
            paths,
            {"accel": res.accel, "machine": res.machine, "qemu": build.version,
             "command": res.command, "description": spec.source, "started": now_iso()},
        )  # fmt: skip
        if console:
            with open(paths.log, "ab") as log:
                proc = subprocess.Popen(res.command, stderr=log)
        else:
            launch_detached(res.command, spec, area)
        try:
            with wait_for_qmp(paths, proc=proc) as client:
                # Ended with QEMU below, should anything fail (its socket closes).
                starting = keeper.start(area) if keep else None
                _start(client, area, spec, offset, res, plan, starting)
        except BaseException:
            if proc is not None:
                proc.kill()
                _ended(area, spec, proc)
            else:
                _kill_started(paths)
            raise
        finally:
            if starting is not None:
                starting.close()
    return proc


def _kill_started(paths: RunPaths) -> None:
    """End a QEMU that started but could not be set up (the saved state stays)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(paths.pidfile.read_text().split()[0])
        os.kill(pid, 9)


def _ended(area: Path, spec: QemuSpec, proc: subprocess.Popen[bytes]) -> None:
    """After a foreground QEMU: what the shell parent does for a detached one."""
    code = proc.wait()
    paths = RunPaths(area)
    if not (area / spec.state_file).exists():
        (area / spec.ram_file).unlink(missing_ok=True)
    paths.pidfile.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        note_closed(area, spec)
    paths.exit.write_text(f"{code}\n")
