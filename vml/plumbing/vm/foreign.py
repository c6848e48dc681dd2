"""Save a running QEMU that VML did not start, through its QMP socket; resume it.

``qmp_snapshot(area, socket)`` (``vml commit --qmp SOCKET``):

1. ask QEMU which images it writes (``query-block``): each must be a file
   of the area (the entry holds them); read-only ones are left alone;
2. ``migrate`` its whole state, devices and RAM, to a file in the area's
   stage *while the guest runs* (precopy; the bandwidth limit is lifted for
   the save and put back after): QEMU pauses the guest by itself for the
   last round (its ``downtime-limit``), and a guest that dirties memory
   faster than the stream is written is stopped after ``converge`` seconds
   so the migration ends;
3. while it is paused (``postmigrate``), copy the area's disk images aside
   (holes stay holes; a reflink where the file system shares blocks);
4. ``cont``: the guest goes on, and the caller saves the copies.

The pause is the last round of the migration plus the copy of the disks'
data (``docs/VMS.md`` has measurements).  Unlike a VM under ``vml run``,
RAM is not a file here: every save writes and reads the whole stream.

The state is QEMU's own stream (``<stem>.migstream``), so the user's own
command line with ``-incoming "exec:cat FILE"`` resumes it; the resume file
(``resume``) records that command line, read from the QEMU process, and
``resume_qmp`` (``vml run``) runs it again with the area's paths.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vml.errors import AreaError, IncompatibleState, QMPError, VMControlError
from vml.plumbing.vm.qemu import (
    RunPaths,
    copy_sparse,
    current_machine,
    load_device_state,
    now_iso,
    prepare_run_dir,
    version_tuple,
    wait_for_qmp,
    write_run_info,
)
from vml.plumbing.vm.qmp import QMPClient
from vml.plumbing.vm.resume import (
    RESUME_SUFFIX,
    STATE_SUFFIXES,
    ForeignSnapshot,
    ResumeInfo,
    discard,
    drop_stage,
    new_stage,
    remap,
    stem_for,
)

FD_NAME = "vmlsave"
#: The bandwidth limit while saving to a file (bytes/s): none to speak of.
SAVE_BANDWIDTH = 1 << 40
#: Options of the user's command line that ``vml run`` replaces (with their argument).
_REPLACED_WITH_ARG = ("-qmp", "-qmp-pretty", "-monitor", "-pidfile", "-incoming")
_REPLACED = ("-daemonize", "-S")


@dataclass(frozen=True)
class Peer:
    """The QEMU process at the other end of a QMP socket, as ``/proc`` shows it."""

    argv: tuple[str, ...] = ()
    cwd: str = ""
    open_files: tuple[str, ...] = ()  # paths of the files it has open


def peer(client: QMPClient) -> Peer:
    """The QEMU at the other end of ``client`` (``SO_PEERCRED``); empty when unknown.

    Unknown: another user's process, another pid namespace, not a QEMU.
    """
    try:
        creds = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
        fds = os.listdir(f"/proc/{pid}/fd")
    except (OSError, struct.error):
        return Peer()
    argv = tuple(os.fsdecode(a) for a in raw.split(b"\0")[:-1])
    if not argv or "qemu" not in Path(argv[0]).name:
        return Peer()
    opened = []
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("/"):
                opened.append(target)
    return Peer(argv, cwd, tuple(opened))


def _inside(area: Path, path: str) -> str | None:
    """``path`` as an area-relative name, or None when it is not a file of the area."""
    real_area = os.path.realpath(area)
    real = os.path.realpath(path)
    if not real.startswith(real_area.rstrip(os.sep) + os.sep):
        return None
    rel = Path(os.path.relpath(real, real_area)).as_posix()
    return None if rel.split("/")[0] == ".vml" else rel


def _resolve(name: str, who: Peer) -> tuple[str, str | None]:
    """An image name as QEMU reports it, made absolute; and QEMU's folder, if it tells.

    A relative name is relative to the folder QEMU started in, which
    ``-daemonize`` leaves for ``/``: the file QEMU has open under that name
    says which it is (and so where QEMU started).
    """
    if os.path.isabs(name):
        return name, None
    found = {p for p in who.open_files if p.endswith("/" + name.removeprefix("./"))}
    if len(found) == 1:
        path = found.pop()
        return path, path[: -len(name.removeprefix("./"))].rstrip("/") or "/"
    return os.path.join(who.cwd or os.getcwd(), name), None


def _started_in(who: Peer, area: Path) -> str:
    """The folder QEMU's relative paths are relative to, as well as it can be told.

    ``-daemonize`` moves QEMU to ``/``, forgetting where it started: then
    the area itself, where such a command line is usually typed.
    """
    daemonized = any(a.lstrip("-") == "daemonize" for a in who.argv)
    return str(area.resolve()) if daemonized and who.cwd == "/" else who.cwd


def written_disks(client: QMPClient, area: Path, who: Peer) -> tuple[list[str], str | None]:
    """Area-relative names of the images QEMU writes, and the folder QEMU started in if known.

    ``AreaError`` for an image it writes outside the area.
    """
    out: list[str] = []
    outside: list[str] = []
    started: str | None = None
    for dev in client.execute("query-block"):
        inserted = dev.get("inserted") if isinstance(dev, dict) else None
        if not isinstance(inserted, dict) or inserted.get("ro"):
            continue
        name = str(inserted.get("file", ""))
        rel = None
        if name and not re.match(r"^[\w+-]+:", name):  # not json:, nbd:, ...
            path, folder = _resolve(name, who)
            started = started or folder
            rel = _inside(area, path)
        if rel is None:
            outside.append(name or str(dev.get("device") or dev.get("qdev")))
        elif rel not in out:
            out.append(rel)
    if outside:
        raise AreaError(
            f"the QEMU writes images outside the area {area}: {', '.join(outside)}",
            "move them into the area (the entry holds the VM's disks), or make them read-only",
        )
    return out, started


def _accel(client: QMPClient) -> str:
    with contextlib.suppress(QMPError):
        kvm = client.execute("query-kvm")
        if isinstance(kvm, dict) and kvm.get("enabled"):
            return "kvm"
    return "tcg"


def _version(client: QMPClient) -> str:
    v = client.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
    return f"{v.get('major', 0)}.{v.get('minor', 0)}.{v.get('micro', 0)}"


def _name(client: QMPClient, area: Path) -> str:
    with contextlib.suppress(QMPError):
        name = client.execute("query-name").get("name")
        if isinstance(name, str) and name:
            return stem_for(name, "vm")
    return stem_for(area.resolve().name, "vm")


@contextlib.contextmanager
def _migration_settings(client: QMPClient) -> Iterator[None]:
    """No bandwidth limit and RAM in the stream for the save; the user's settings after."""
    params = client.execute("query-migrate-parameters")
    caps = {c["capability"]: c["state"] for c in client.execute("query-migrate-capabilities")}
    client.execute("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
    if caps.get("x-ignore-shared"):  # RAM in a shared file would be left out
        _set_cap(client, "x-ignore-shared", False)
    try:
        yield
    finally:
        with contextlib.suppress(QMPError):
            client.execute("migrate-set-parameters", {"max-bandwidth": params["max-bandwidth"]})
            if caps.get("x-ignore-shared"):
                _set_cap(client, "x-ignore-shared", True)


def _set_cap(client: QMPClient, name: str, state: bool) -> None:
    client.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": name, "state": state}]}
    )


def _migrate_live(client: QMPClient, dest: Path, converge: float, timeout: float) -> dict[str, Any]:
    """Migrate to ``dest`` while the guest runs; return QEMU's final ``query-migrate``.

    QEMU stops the guest for the last round.  One that has not converged after
    ``converge`` seconds is stopped, so the rest goes at once.
    """
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        client.execute("getfd", {"fdname": FD_NAME}, fds=[fd])
    finally:
        os.close(fd)
    client.execute("migrate", {"uri": f"fd:{FD_NAME}"})
    start = time.monotonic()
    stopped = False
    delay = 0.002
    while True:
        info = client.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return info  # type: ignore[no-any-return]
        if status in ("failed", "cancelled"):
            raise VMControlError(f"QEMU could not save its state: {info.get('error-desc', status)}")
        if status == "pre-switchover":  # the user's pause-before-switchover capability
            client.execute("migrate-continue", {"state": "pre-switchover"})
        elapsed = time.monotonic() - start
        if not stopped and elapsed > converge:
            client.execute("stop")
            stopped = True
        if elapsed > timeout:
            with contextlib.suppress(QMPError):
                client.execute("migrate_cancel")
            raise VMControlError(f"QEMU did not save its state in {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _stamp(event: dict[str, Any] | None) -> float | None:
    ts = event.get("timestamp") if event else None
    if not isinstance(ts, dict):
        return None
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


def _pause(client: QMPClient, fallback: float) -> float:
    """From QEMU's STOP event to its RESUME event (``fallback`` when they are missing)."""
    stops = [_stamp(e) for e in client.events if e.get("event") == "STOP"]
    resumes = [_stamp(e) for e in client.events if e.get("event") == "RESUME"]
    if stops and resumes and stops[0] is not None and resumes[-1] is not None:
        return max(resumes[-1] - stops[0], 0.0)
    return fallback


@contextlib.contextmanager
def qmp_snapshot(
    area: Path, qmp: Path, *, converge: float = 30.0, timeout: float = 600.0
) -> Iterator[ForeignSnapshot]:
    """Save the QEMU on the QMP socket ``qmp`` running the VM of ``area``; see the module doc.

    Yields the staged state, resume file and disk copies; the stage is
    removed on exit.  The guest is continued on any error.  A QEMU that is
    not running, or writes images outside the area, is refused before
    anything is paused or written.
    """
    stage: Path | None = None
    try:
        with QMPClient.connect(qmp, timeout=30.0) as client:
            plan = _plan(client, area)
            stage = new_stage(area)
            snap = _save(client, stage, plan, converge, timeout)
        yield snap
    finally:
        if stage is not None:
            drop_stage(stage)


@dataclass(frozen=True)
class _Plan:
    info: ResumeInfo
    disks: list[str]
    hint: str | None  # why a migration may fail: said if it does


def _plan(client: QMPClient, area: Path) -> _Plan:
    """What to save: refuse a QEMU that is not running or writes outside the area."""
    status = client.execute("query-status").get("status")
    if status != "running":
        raise VMControlError(
            f"the QEMU on that socket is {status}, not running",
            "continue it (QMP `cont`; `vml run --continue --qmp SOCKET`), then save again",
        )
    who = peer(client)
    disks, started = written_disks(client, area, who)
    stem = _name(client, area)
    info = ResumeInfo(
        via="qmp",
        state=stem + STATE_SUFFIXES["qmp"],
        area=str(area.resolve()),
        saved=now_iso(),
        qemu=_version(client),
        machine=current_machine(client),
        accel=_accel(client),
        command=who.argv,
        cwd=started or _started_in(who, area),
    )
    hint = None
    if who.cwd == "/" and started is not None:
        # QEMU reopens images by name when it hands them over.
        hint = (
            "QEMU was started with relative image paths and -daemonize (which moves it to /): "
            "start it with absolute paths"
        )
    return _Plan(_with_how(info), disks, hint)


def _save(
    client: QMPClient, stage: Path, plan: _Plan, converge: float, timeout: float
) -> ForeignSnapshot:
    """Migrate live, copy the disks while QEMU is paused at the end, continue it."""
    info, area = plan.info, Path(plan.info.area)
    files: dict[str, Path] = {info.state: stage / info.state}
    steps: dict[str, float] = {}
    copied = 0
    t = time.monotonic()
    with _migration_settings(client):
        try:
            try:
                mig = _migrate_live(client, files[info.state], converge, timeout)
            except VMControlError as e:
                e.remedy = plan.hint or e.remedy
                raise
            steps["live"] = time.monotonic() - t
            t = time.monotonic()
            for rel in plan.disks:
                files[rel] = stage / "disks" / rel
                files[rel].parent.mkdir(parents=True, exist_ok=True)
                copied += copy_sparse(area / rel, files[rel])
            steps["copy"] = time.monotonic() - t
        finally:
            t2 = time.monotonic()
            try:
                client.execute("cont", timeout=60.0)
            except QMPError as e:
                raise VMControlError(
                    f"the QEMU was paused and could not be continued: {e.message}",
                    "continue it through its QMP socket (`vml run --continue --qmp SOCKET`)",
                ) from e
            steps["cont"] = time.monotonic() - t2
    steps["downtime"] = float(mig.get("downtime", 0)) / 1000
    pause = _pause(client, steps["downtime"] + steps["copy"] + steps["cont"])
    resume = stage / (Path(info.state).stem + RESUME_SUFFIX)
    info.write(resume)
    files[resume.name] = resume
    record: dict[str, object] = {
        "via": "qmp", "pause_seconds": round(pause, 4), "state_file": info.state,
        "resume_file": resume.name, "qemu": info.qemu, "machine": info.machine,
        "accel": info.accel, "saved": info.saved,
        "steps": {k: round(v, 4) for k, v in steps.items()}, "copied_bytes": copied,
        "domain": None,
    }  # fmt: skip
    return ForeignSnapshot(files, pause, record)


def _with_how(info: ResumeInfo) -> ResumeInfo:
    how = (
        f"`vml run AREA` resumes it; by hand: your QEMU command line with the disks in "
        f"this area, -machine {info.machine}, and -incoming 'exec:cat {info.state}'"
    )
    return ResumeInfo(**{**info.__dict__, "resume": how})


# --- resuming ---------------------------------------------------------------------


def _machine_arg(value: str, machine: str) -> str:
    """A ``-machine`` argument with its type replaced by ``machine``."""
    parts = re.split(r"(?<!,),(?!,)", value)
    for i, p in enumerate(parts):
        if p.startswith("type="):
            parts[i] = f"type={machine}"
            return ",".join(parts)
    if parts and "=" not in parts[0]:
        parts[0] = machine
    else:
        parts.insert(0, machine)
    return ",".join(parts)


def resume_command(area: Path, info: ResumeInfo) -> list[str]:
    """The command line that resumes ``info`` in ``area``: the saved one, adapted.

    Paths into the area it was saved from point into ``area``; the machine
    type is the concrete one the state was saved with; the user's QMP and
    monitor sockets, pid file, ``-daemonize`` and ``-S`` give way to VML's
    own (``.vml/run/``), and it waits for the state (``-incoming defer``).
    """
    if not info.command:
        raise IncompatibleState(
            "the saved running state does not record QEMU's command line "
            "(it could not be read when it was saved)",
            info.resume.replace("`vml run AREA` resumes it; by hand: ", "resume it with "),
        )
    old, new = info.area, str(area.absolute())
    cmd: list[str] = []
    args = list(info.command)
    machine_seen = False
    i = 0
    while i < len(args):
        a = args[i]
        opt = "-" + a.lstrip("-") if a.startswith("-") else a
        if opt in _REPLACED_WITH_ARG:
            i += 2
            continue
        if opt in _REPLACED:
            i += 1
            continue
        if opt in ("-machine", "-M") and i + 1 < len(args):
            cmd += [a, _machine_arg(remap(args[i + 1], old, new), info.machine)]
            machine_seen = True
            i += 2
            continue
        cmd.append(remap(a, old, new))
        i += 1
    if not machine_seen:
        cmd += ["-machine", info.machine]
    paths = RunPaths(area)
    cmd += ["-qmp", f"unix:{paths.socket_target()},server=on,wait=off"]
    cmd += ["-pidfile", str(paths.pidfile.absolute()), "-S", "-incoming", "defer"]
    return cmd


def check_qemu(info: ResumeInfo, binary: str) -> None:
    """Refuse a QEMU that is missing or older than the one that saved ``info``."""
    found = shutil.which(binary)
    if found is None:
        raise IncompatibleState(
            f"the saved running state needs {binary}, which is not here",
            "install QEMU, or resume it by hand (see the area's *.resume.json)",
        )
    done = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", done.stdout)
    if m is None or version_tuple(m.group(1)) < version_tuple(info.qemu):
        raise IncompatibleState(
            f"the saved running state was made by QEMU {info.qemu}; {found} is "
            f"{m.group(1) if m else 'of unknown version'} and cannot load it"
        )


#: The shell parent of a resumed QEMU: wait for it, then record its exit status.
_WRAPPER = (
    '( run=$1; shift; "$@" >>"$run/qemu.log" 2>&1 </dev/null; rc=$?; rm -f "$run/qemu.pid"; '
    'echo $rc >"$run/exit.tmp"; mv "$run/exit.tmp" "$run/exit" ) </dev/null >/dev/null 2>&1 &'
)


def resume_qmp(area: Path, rel: str, info: ResumeInfo, cmd: list[str]) -> None:
    """Start ``cmd`` (``resume_command``) in the background, load the state, continue.

    The caller holds the area's lock.  The state and resume file are deleted
    once the guest runs; on failure QEMU is ended and both stay.
    """
    paths = prepare_run_dir(area)
    write_run_info(
        paths,
        {"accel": info.accel, "machine": info.machine, "qemu": info.qemu, "command": cmd,
         "description": rel, "started": now_iso()},
    )  # fmt: skip
    # Relative names in the command line are relative to QEMU's folder then.
    cwd = remap(info.cwd, info.area, str(area.absolute())) if info.cwd else ""
    subprocess.Popen(
        ["/bin/sh", "-c", _WRAPPER, "sh", str(paths.dir.absolute()), *cmd],
        cwd=cwd if os.path.isdir(cwd) else area,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    ).wait()
    try:
        with wait_for_qmp(paths) as client:
            try:
                load_device_state(client, area / info.state, 0)
            except VMControlError as e:
                raise IncompatibleState(
                    f"QEMU could not load the saved running state: {e.message}",
                    "remove the area's *.resume.json and state to start afresh",
                ) from e
            client.execute("cont")
    except BaseException:
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(paths.pidfile.read_text().split()[0]), 9)
        raise
    discard(area, rel)


def continue_qmp(qmp: Path) -> bool:
    """``cont`` the QEMU on ``qmp`` if it is paused; whether it was running already."""
    with QMPClient.connect(qmp) as c:
        status = c.execute("query-status").get("status")
        if status == "running":
            return True
        if status not in ("paused", "postmigrate", "prelaunch"):
            raise VMControlError(f"the QEMU on {qmp} is {status} and cannot be continued")
        c.execute("cont")
    return False
