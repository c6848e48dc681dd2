"""Save a running QEMU that VML did not start, through its QMP socket.

``qmp_snapshot(area, socket)`` (``vml commit --qmp SOCKET``):

1. ask QEMU which images it writes (``query-block``): each must be a file
   of the area (the entry holds them); read-only ones are left alone;
2. ``migrate`` its whole state, devices and RAM, to a file in the area's
   stage *while the guest runs* (precopy, the bandwidth limit lifted), with
   ``pause-before-switchover``: QEMU pauses the guest for the last round
   and waits, its images still in its hands (a guest that dirties memory
   faster than the stream goes is stopped after ``converge`` seconds);
3. in that pause, one ``transaction`` of ``blockdev-snapshot-sync`` puts a
   qcow2 overlay (``.vml/overlays/``) over each image it writes; then the
   migration ends (``migrate-continue``) and ``cont``: the guest goes on,
   writing into the overlays, while the area's images stay exactly as they
   were at the pause, consistent with the memory, and the save reads them
   where they are;
4. after the save, ``block-commit`` merges each overlay back into its image
   (``base-node``: only that layer, never the user's own backing chain) and
   the overlay is deleted.  A save killed in between leaves QEMU on its
   overlays: the next save merges them back first (``recover``).

The pause is the last round of the migration and the overlays' creation,
whatever the disks' size (``docs/VMS.md``: 0.03 s; copying the disks in the
pause instead cost 1-4 s per GiB of data here).  Unlike a VM under ``vml
run``, RAM is not a file: every save writes and reads the whole stream.
The settings changed for the save (bandwidth, capabilities) are put back.

The state is QEMU's own stream (``<stem>.migstream``), so the user's own
command line with ``-incoming "exec:cat FILE"`` resumes it; the resume file
records that command line, read from the QEMU process (``rerun`` runs it).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vml.errors import AreaError, QMPError, VMControlError
from vml.plumbing.vm.ignore import RESUME_SUFFIX, VML_DIR
from vml.plumbing.vm.qemu import (
    current_machine,
    now_iso,
    wait_finalized,
)
from vml.plumbing.vm.qmp import QMPClient
from vml.plumbing.vm.resume import (
    STATE_SUFFIXES,
    ForeignSnapshot,
    ResumeInfo,
    drop_overlay,
    drop_stage,
    new_stage,
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


def written_disks(
    client: QMPClient, area: Path, who: Peer
) -> tuple[list[tuple[str, str]], str | None]:
    """(area-relative image, its node) for each image QEMU writes, and QEMU's start folder.

    ``AreaError`` for an image it writes outside the area.
    """
    out: list[tuple[str, str]] = []
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
        elif rel not in [r for r, _ in out]:
            out.append((rel, str(inserted.get("node-name"))))
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
    """Bandwidth unlimited, RAM in the stream, a stop before the switch-over; then as before."""
    params = client.execute("query-migrate-parameters")
    caps = {c["capability"]: c["state"] for c in client.execute("query-migrate-capabilities")}
    wanted = {"pause-before-switchover": True, "x-ignore-shared": False}
    changed = {k: v for k, v in wanted.items() if caps.get(k, not v) != v}
    client.execute("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
    _set_caps(client, changed)
    try:
        yield
    finally:
        # QEMU refuses capability changes while a cancelled migration is
        # still cancelling: wait for it to end (a capability left on would
        # stop the user's own next migration before its switch-over).
        _migration_ended(client)
        with contextlib.suppress(QMPError):
            client.execute("migrate-set-parameters", {"max-bandwidth": params["max-bandwidth"]})
            _set_caps(client, {k: not v for k, v in changed.items()})


def _migration_ended(client: QMPClient, timeout: float = 30.0) -> bool:
    """Wait until no migration is under way; False when it still is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = client.execute("query-migrate")
        except QMPError:
            return False
        status = info.get("status") if isinstance(info, dict) else None
        if status in (None, "none", "completed", "failed", "cancelled"):
            return True
        time.sleep(0.02)
    return False


def _set_caps(client: QMPClient, caps: dict[str, bool]) -> None:
    if caps:
        client.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )


def _migrate_until_switchover(
    client: QMPClient, dest: Path, converge: float, timeout: float
) -> None:
    """Migrate to ``dest`` while the guest runs, until QEMU paused it before the switch-over.

    A guest that has not converged after ``converge`` seconds is stopped, so
    the rest goes at once.
    """
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        client.execute("getfd", {"fdname": FD_NAME}, fds=[fd])
    finally:
        os.close(fd)
    client.execute("migrate", {"uri": f"fd:{FD_NAME}"})
    _wait_status(client, ("pre-switchover",), converge, timeout)


def _wait_status(
    client: QMPClient, want: tuple[str, ...], converge: float, timeout: float
) -> dict[str, Any]:
    start = time.monotonic()
    stopped = False
    delay = 0.001
    while True:
        info = client.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status in want:
            return info  # type: ignore[no-any-return]
        if status in ("failed", "cancelled", "completed", None):
            why = info.get("error-desc", status) if isinstance(info, dict) else status
            raise VMControlError(f"QEMU could not save its state: {why or 'no reason given'}")
        elapsed = time.monotonic() - start
        if not stopped and elapsed > converge:
            client.execute("stop")
            stopped = True
        if elapsed > timeout:
            with contextlib.suppress(QMPError):
                client.execute("migrate_cancel")
            raise VMControlError(f"QEMU did not save its state in {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


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


@dataclass(frozen=True)
class _Disk:
    rel: str  # the image, area-relative
    node: str  # the node QEMU writes it through: the overlay goes over it
    overlay: Path


@dataclass(frozen=True)
class _Plan:
    info: ResumeInfo
    disks: list[tuple[str, str]]  # (image, node)
    hint: str | None  # why a migration may fail: said if it does


@contextlib.contextmanager
def qmp_snapshot(
    area: Path, qmp: Path, *, converge: float = 30.0, timeout: float = 600.0
) -> Iterator[ForeignSnapshot]:
    """Save the QEMU on the QMP socket ``qmp`` running the VM of ``area``; see the module doc.

    Yields the staged state and resume file: the area's images themselves
    are the consistent disks until the context ends, when QEMU goes back
    onto them.  The guest is continued on any error.  A QEMU that is not
    running, or writes images outside the area, is refused before anything
    is paused or written.  The QMP socket is free while the caller saves.
    """
    stage: Path | None = None
    disks: list[_Disk] = []
    try:
        with QMPClient.connect(qmp, timeout=30.0) as client:
            recover(client, area)
            plan = _plan(client, area)
            stage = new_stage(area)
            stamp = f"{os.getpid()}-{time.time_ns()}"
            disks = [  # absolute: QEMU opens them from where it runs
                _Disk(rel, node, overlay_dir(area.resolve()) / f"disk{i}-{stamp}.qcow2")
                for i, (rel, node) in enumerate(plan.disks)
            ]
            snap = _save(client, stage, plan, disks, converge, timeout)
        yield snap
    finally:
        try:
            if disks:
                with QMPClient.connect(qmp, timeout=60.0) as client:
                    _merge_back(client, area, disks)
        finally:
            if stage is not None:
                drop_stage(stage)


def overlay_dir(area: Path) -> Path:
    """``<area>/.vml/overlays``: where a save puts the guest's writes meanwhile."""
    return area / VML_DIR / "overlays"


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


def _overlays(client: QMPClient, disks: list[_Disk]) -> None:
    """One overlay over each written image, all at once."""
    if not disks:
        return
    disks[0].overlay.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        {"type": "blockdev-snapshot-sync",
         "data": {"node-name": d.node, "snapshot-file": str(d.overlay),
                  "snapshot-node-name": f"vml-overlay-{i}", "format": "qcow2"}}
        for i, d in enumerate(disks)
    ]  # fmt: skip
    client.execute("transaction", {"actions": actions})


def _save(
    client: QMPClient,
    stage: Path,
    plan: _Plan,
    disks: list[_Disk],
    converge: float,
    timeout: float,
) -> ForeignSnapshot:
    """Migrate live, put overlays over the disks in the pause, continue the guest."""
    info = plan.info
    state = stage / info.state
    steps: dict[str, float] = {}
    t = time.monotonic()
    with _migration_settings(client):
        try:
            try:
                _migrate_until_switchover(client, state, converge, timeout)
            except VMControlError as e:
                e.remedy = plan.hint or e.remedy
                raise
            steps["live"] = time.monotonic() - t
            t = time.monotonic()
            _overlays(client, disks)
            steps["overlays"] = time.monotonic() - t
            client.execute("migrate-continue", {"state": "pre-switchover"})
            mig = _wait_status(client, ("completed",), timeout, timeout)
            wait_finalized(client)  # else `cont` may be refused, the disks left inactive
            steps["switchover"] = time.monotonic() - t - steps["overlays"]
        except BaseException:
            with contextlib.suppress(QMPError):
                client.execute("migrate_cancel")
            for d in disks:  # a failed transaction made none
                if _in_use(client, d.overlay) is False:
                    d.overlay.unlink(missing_ok=True)
            raise
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
    pause = _pause(client, steps["downtime"] + steps["overlays"] + steps["cont"])
    resume = stage / (Path(info.state).stem + RESUME_SUFFIX)
    info.write(resume)
    record: dict[str, object] = {
        "via": "qmp", "pause_seconds": round(pause, 4), "state_file": info.state,
        "resume_file": resume.name, "qemu": info.qemu, "machine": info.machine,
        "accel": info.accel, "saved": info.saved,
        "steps": {k: round(v, 4) for k, v in steps.items()}, "copied_bytes": 0,
        "domain": None,
    }  # fmt: skip
    return ForeignSnapshot({info.state: state, resume.name: resume}, pause, record)


def _in_use(client: QMPClient, path: Path) -> bool | None:
    """Whether QEMU has ``path`` in its block graph; None when it cannot be told.

    Callers delete an overlay only on a sure False: one QEMU still writes
    holds every write the guest made since the pause.
    """
    try:
        devices = client.execute("query-block")
    except QMPError:
        return None
    for dev in devices if isinstance(devices, list) else []:
        inserted = dev.get("inserted") if isinstance(dev, dict) else None
        if isinstance(inserted, dict) and inserted.get("file") == str(path):
            return True
    return False if isinstance(devices, list) else None


def _commit_job(client: QMPClient, args: dict[str, Any], timeout: float = 3600.0) -> None:
    """Run one active ``block-commit`` to its end (ready, then complete)."""
    job = str(args["job-id"])
    client.execute("block-commit", args)
    deadline = time.monotonic() + timeout
    completing = False
    while True:
        jobs = {j.get("device"): j for j in client.execute("query-block-jobs")}
        mine = jobs.get(job)
        if mine is None:
            return  # done (and dismissed); the caller checks the graph
        if mine.get("ready") and not completing:
            client.execute("block-job-complete", {"device": job})
            completing = True
        if time.monotonic() > deadline:
            raise VMControlError(f"merging {job} back did not end in {timeout:.0f} s")
        time.sleep(0.02)


def _merge_back(client: QMPClient, area: Path, disks: list[_Disk]) -> None:
    """Merge each overlay back into the image under it; delete it."""
    problems: list[str] = []
    for i, d in enumerate(disks):
        used = _in_use(client, d.overlay)
        if used is None:
            problems.append(f"{d.rel}: QEMU did not say whether it still writes {d.overlay.name}")
            continue
        if not used:
            problems += filter(None, [drop_overlay(d.overlay)])
            continue
        try:
            _commit_job(
                client,
                {"job-id": f"vml-merge-{i}", "device": f"vml-overlay-{i}", "base-node": d.node},
            )
        except (QMPError, VMControlError) as e:
            problems.append(f"{d.rel}: {e.message}")
            continue
        if _in_use(client, d.overlay) is False:
            problems += filter(None, [drop_overlay(d.overlay)])
        else:
            problems.append(f"{d.rel}: still on {d.overlay.name}")
    with contextlib.suppress(OSError):
        overlay_dir(area).rmdir()
    if problems:
        raise VMControlError(
            f"the QEMU still runs on overlays in {overlay_dir(area)} ({'; '.join(problems)})",
            "the next `vml commit --qmp` merges them back (QMP block-commit does it by hand)",
        )


def _finish_jobs(client: QMPClient, timeout: float = 3600.0) -> None:
    """End the merges a killed save left running: complete the ready ones, wait for all.

    A block job still there keeps its nodes busy: every later merge of
    those disks would be refused until it ends.
    """
    deadline = time.monotonic() + timeout
    completed: set[str] = set()
    while True:
        jobs = [
            j
            for j in client.execute("query-block-jobs")
            if isinstance(j, dict) and str(j.get("device", "")).startswith("vml-")
        ]
        if not jobs:
            return
        for j in jobs:
            job = str(j["device"])
            if j.get("ready") and job not in completed:
                client.execute("block-job-complete", {"device": job})
                completed.add(job)
        if time.monotonic() > deadline:
            raise VMControlError(
                f"a merge a killed save left ({jobs[0]['device']}) did not end in {timeout:.0f} s"
            )
        time.sleep(0.02)


def recover(client: QMPClient, area: Path) -> None:
    """Merge back the overlays a killed save left QEMU on (images in ``.vml/overlays``)."""
    _finish_jobs(client)
    left = []
    for dev in client.execute("query-block"):
        inserted = dev.get("inserted") if isinstance(dev, dict) else None
        if not isinstance(inserted, dict):
            continue
        name = str(inserted.get("file", ""))
        if os.path.dirname(name) == str(overlay_dir(area).resolve()):
            left.append((str(inserted.get("node-name")), str(inserted.get("backing_file")), name))
    for i, (node, base, name) in enumerate(left):
        _commit_job(client, {"job-id": f"vml-recover-{i}", "device": node, "base": base})
        if _in_use(client, Path(name)) is False:
            drop_overlay(Path(name))  # (left: the stranded check names it)


def _with_how(info: ResumeInfo) -> ResumeInfo:
    how = (
        f"`vml run AREA` resumes it; by hand: your QEMU command line with the disks in "
        f"this area, -machine {info.machine}, and -incoming 'exec:cat {info.state}'"
    )
    return ResumeInfo(**{**info.__dict__, "resume": how})
