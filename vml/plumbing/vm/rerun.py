"""Resume a running state saved through QMP: the QEMU command line it was saved from, again.

``resume_command`` adapts the saved command line (``resume.ResumeInfo``) to
the area it is checked out to; ``resume_qmp`` runs it in the background
under VML (``.vml/run/``, as ``vml run`` does), feeds it the saved stream
and continues the guest.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from vml.errors import IncompatibleState, VMControlError
from vml.plumbing.vm.qemu import (
    RunPaths,
    load_device_state,
    now_iso,
    prepare_run_dir,
    version_tuple,
    wait_for_qmp,
    write_run_info,
)
from vml.plumbing.vm.qmp import QMPClient
from vml.plumbing.vm.resume import ResumeInfo, discard, remap

#: Options of the user's command line that ``vml run`` replaces (with their argument).
_REPLACED_WITH_ARG = ("-qmp", "-qmp-pretty", "-monitor", "-pidfile", "-incoming")
_REPLACED = ("-daemonize", "-S")


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
