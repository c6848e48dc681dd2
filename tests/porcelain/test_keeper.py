"""A guest that powers itself off keeps its raw disks' dirty ranges (the keeper, ``vml.plumbing.keeper``).

The VM of ``test_raw_kept_ranges`` (one raw disk; SeaBIOS finds nothing to
boot and waits) is made to do what a guest's kernel does to power off or
reboot: write to the ACPI power-management control register (SLP_EN with
S5; q35, where SeaBIOS puts the PM registers at 0x600) or to the reset
control register 0xCF9, through QEMU's HMP ``o``.  Nothing of ``vml stop``
runs: QEMU sees the guest power off, and only the keeper can keep the
ranges.  Every entry is checked byte for byte against the disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.test_cli import vml
from tests.conftest import need
from tests.porcelain import test_raw_kept_ranges as raw
from tests.porcelain.test_dirty_bitmaps import guest_write
from vml.plumbing import dirty
from vml.plumbing.areas import keeper_pid, lock_area
from vml.plumbing.keeper import keep_and_quit
from vml.plumbing.repository import Repository, init_repository
from vml.plumbing.vm import bitmaps
from vml.plumbing.vm.description import find_spec
from vml.plumbing.vm.qemu import RunPaths, runstate, vml_vm
from vml.plumbing.vm.qmp import QMPClient
from vml.porcelain.commit import CommitResult, commit
from vml.porcelain.run import run
from vml.porcelain.stop import stop
from vml.porcelain.vminit import vm_init

MiB = raw.MiB
RAW = raw.RAW
lab = raw.lab  # a fixture: a repository, and an area whose VM has one raw disk
WAIT = 60.0  # a deadline for what must happen, never a timing assertion
KEPT = [(20 * MiB, 20 * MiB + (64 << 10)), (40 * MiB, 40 * MiB + (128 << 10))]


def _io_write(area: Path, port: int, value: int, size: str = "b", event: str | None = None) -> None:
    """An I/O port write by the guest (HMP ``o``, ``size`` b/h/w); wait for QEMU's ``event`` if given."""
    with QMPClient.connect(RunPaths(area).qmp) as c:
        c.execute("human-monitor-command", {"command-line": f"o /{size} {port:#x} {value:#x}"})
        if event is not None:
            assert c.wait_event(event, WAIT) is not None, f"no {event}"


#: The ACPI PM1a control register, once the firmware has put it there.
PM1A_CNT = "0000000000000604-0000000000000605 (prio 0, i/o): acpi-cnt"


def power_off_inside(area: Path) -> None:
    """The guest powers itself off (ACPI S5 into PM1a_CNT), as ``poweroff`` in it does.

    Once SeaBIOS has set the ACPI registers up (at each boot), as a
    guest's kernel finds them.
    """

    def ready() -> bool:
        with QMPClient.connect(RunPaths(area).qmp) as c:
            tree = c.execute("human-monitor-command", {"command-line": "info mtree -f"})
        return PM1A_CNT in str(tree)

    _wait_for("the firmware did not set ACPI up", ready)
    _io_write(area, 0x604, 0x2000, size="h")


def reboot_inside(area: Path) -> None:
    """The guest reboots itself (the reset control register), as ``reboot`` in it may."""
    _io_write(area, 0xCF9, 0x06, event="RESET")


def wait_ended(area: Path) -> None:
    """Wait for QEMU to end and its shell parent to note it."""
    deadline = time.monotonic() + WAIT
    while vml_vm(area) is not None or not RunPaths(area).exit.exists():
        assert time.monotonic() < deadline, f"QEMU did not end (it is {runstate(area)})"
        time.sleep(0.05)


def _wait_for(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _kept(area: Path) -> list[tuple[int, int]]:
    rec = bitmaps.load_records(area)[RAW]
    return bitmaps.read_kept(area, rec, rec.kept)


def _started(lab: tuple[Repository, Path]) -> tuple[Repository, Path, int]:
    """The lab's first save, its VM running with writes since, and its keeper's pid."""
    repo, area = lab
    raw._first_save_and_write(repo, area)
    pid = keeper_pid(area)
    assert pid
    return repo, area, pid


def _saved_from_kept(
    repo: Repository, area: Path, tmp_path: Path, kept: list[tuple[int, int]]
) -> CommitResult:
    """QEMU ends with ``kept`` kept; the save then notes nothing and holds the disk as it is."""
    wait_ended(area)
    assert _kept(area) == kept
    e2 = commit(repo, area)
    assert e2.notes == []
    raw._same_disk(repo, e2, tmp_path, area)
    return e2


def kill_keeper_and_watcher(area: Path) -> None:
    """SIGKILL the keeper and the shell that would run ``release``: nobody is left to end QEMU."""
    pid = keeper_pid(area)
    assert pid
    watcher = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(watcher, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


def test_a_guest_that_powers_itself_off_keeps_its_ranges(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area, _ = _started(lab)
    power_off_inside(area)
    wait_ended(area)
    assert _kept(area) == KEPT
    _wait_for("the keeper did not end with QEMU", lambda: keeper_pid(area) is None)
    e2 = commit(repo, area)
    assert e2.notes == []
    assert raw._disk_read(area, e2) <= 192 << 10  # the dirty ranges, not the 12 MiB it holds
    raw._same_disk(repo, e2, tmp_path, area)
    # The same bytes as a save that reads the disk whole.
    full = commit(repo, area, kind="full", allow_empty=True)
    assert raw._disk_read(area, full) >= raw.DATA
    raw._same_disk(repo, full, tmp_path, tmp_path / f"check-{e2.entry}")


def test_the_keeper_of_a_deep_area_finds_its_socket(tmp_path: Path) -> None:
    """An area whose path is too long for a unix socket: both of QEMU's sockets are links."""
    area = tmp_path / ("d" * 90) / "lab"
    area.mkdir(parents=True)
    with open(area / RAW, "wb") as f:
        f.truncate(64 * MiB)
    vm_init(area, disks=[area / RAW], memory="16M", network="none")
    repo = init_repository(tmp_path / "repo", 64 << 10)
    raw._first_save_and_write(repo, area)
    try:
        assert RunPaths(area).keeper_qmp.is_symlink()
        power_off_inside(area)
        wait_ended(area)
    finally:
        if vml_vm(area) is not None:
            stop(area, force_kill=True)
    assert _kept(area) == KEPT


def test_a_resumed_guest_that_powers_itself_off_adds_its_ranges_to_those_carried(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area = lab
    raw._first_save_and_write(repo, area)
    stop(area, save=True)
    assert run(area).resumed and keeper_pid(area)
    guest_write(area, 0, 50 * MiB, 4096, 9)
    power_off_inside(area)
    e2 = _saved_from_kept(repo, area, tmp_path, [*KEPT, (50 * MiB, 50 * MiB + (64 << 10))])
    assert raw._disk_read(area, e2) <= 256 << 10


def test_a_reboot_inside_the_guest_ends_nothing(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area, pid = _started(lab)
    reboot_inside(area)
    assert runstate(area) == "running" and keeper_pid(area) == pid
    guest_write(area, 0, 50 * MiB, 4096, 9)  # after the reboot: still recorded
    power_off_inside(area)
    _saved_from_kept(repo, area, tmp_path, [*KEPT, (50 * MiB, 50 * MiB + (64 << 10))])


def test_a_reboot_under_no_reboot_ends_qemu_as_before_with_the_ranges_kept(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area = lab
    vm_init(area, disks=[area / RAW], memory="16M", network="none", qemu_args=["-no-reboot"], force=True)  # fmt: skip
    raw._first_save_and_write(repo, area)
    _io_write(area, 0xCF9, 0x06)  # QEMU takes a reboot for a power-off
    _saved_from_kept(repo, area, tmp_path, KEPT)


def test_a_killed_keeper_lets_qemu_quit_by_itself(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    """What QEMU alone knew is lost (the save reads the disk whole, and says so); QEMU still ends."""
    repo, area, pid = _started(lab)
    os.kill(pid, signal.SIGKILL)
    _wait_for("the keeper did not die", lambda: keeper_pid(area) is None)
    power_off_inside(area)
    wait_ended(area)
    e2 = commit(repo, area)
    assert e2.notes == [raw.KILLED]
    assert raw._disk_read(area, e2) >= raw.DATA
    raw._same_disk(repo, e2, tmp_path, area)


def _run_with_qemu_img(area: Path, fake: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> None:
    """``vml run`` whose keeper finds ``fake`` (a shell script's body) as ``qemu-img``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "qemu-img"
    script.write_text(f"#!/bin/sh\n{fake}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    path = os.environ["PATH"]
    mp.setenv("PATH", f"{folder}:{path}")
    run(area, accel="tcg")  # the keeper starts with that PATH
    mp.setenv("PATH", path)


@pytest.mark.parametrize("end", ["keeper killed", "vml stop --kill"])
def test_while_the_keeper_keeps_qemu_ends_and_no_ranges_count(
    lab: tuple[Repository, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """The keeper killed while it reads the bitmap (its ``qemu-img map`` hangs), or QEMU killed under it."""
    repo, area = lab
    mapping = tmp_path / "mapping"
    hang = f"echo $$ >{mapping}.tmp && mv {mapping}.tmp {mapping}\nexec sleep 600\n"
    _run_with_qemu_img(area, hang, tmp_path, monkeypatch)
    try:
        commit(repo, area)
        guest_write(area, 0, 20 * MiB, 4096, 7)
        power_off_inside(area)
        _wait_for("the keeper did not start keeping", mapping.exists)
        pid = keeper_pid(area)
        assert pid
        if end == "keeper killed":
            os.kill(pid, signal.SIGKILL)
        else:
            assert stop(area, force_kill=True).how == "killed"  # not waiting for the keeper
        wait_ended(area)
    finally:
        if mapping.exists():
            os.kill(int(mapping.read_text()), signal.SIGKILL)
    if end == "keeper killed":
        assert "ending QEMU" in RunPaths(area).keeper_log.read_text()  # `release` did
    _wait_for("the keeper did not end", lambda: keeper_pid(area) is None)
    assert bitmaps.load_records(area)[RAW].kept is None
    e2 = commit(repo, area)
    assert e2.notes == [raw.KILLED]
    raw._same_disk(repo, e2, tmp_path, area)


def test_vml_stop_waits_for_a_keeper_at_work(
    lab: tuple[Repository, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest powered itself off as `vml stop` began: it waits for the keeper instead of failing."""
    repo, area = lab
    mapping, go = tmp_path / "mapping", tmp_path / "go"
    real = shutil.which("qemu-img")
    wait = f'touch {mapping}\nwhile [ ! -e {go} ]; do sleep 0.05; done\nexec {real} "$@"\n'
    _run_with_qemu_img(area, wait, tmp_path, monkeypatch)

    waited: list[str] = []

    class Go(logging.Handler):  # `vml stop` says it waits for the lock: let the keeper go on
        def emit(self, record: logging.LogRecord) -> None:
            waited.append(record.getMessage())
            go.touch()

    logger = logging.getLogger("vml.wait")
    handler = Go()
    logger.addHandler(handler)
    try:
        commit(repo, area)
        guest_write(area, 0, 20 * MiB, 4096, 7)
        power_off_inside(area)
        _wait_for("the keeper did not start keeping", mapping.exists)
        res = stop(area)
    finally:
        logger.removeHandler(handler)
        go.touch()
    assert waited and res.how == "powered off"
    _saved_from_kept(repo, area, tmp_path, [(20 * MiB, 20 * MiB + (64 << 10))])


def test_with_keeper_and_its_watcher_killed_vml_stop_ends_the_paused_qemu(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    """Nobody left to end it: QEMU waits, paused with the guest off, for ``vml stop``, which keeps the ranges."""
    repo, area, _ = _started(lab)
    kill_keeper_and_watcher(area)
    _wait_for("the keeper did not die", lambda: keeper_pid(area) is None)
    power_off_inside(area)
    _wait_for("QEMU did not pause", lambda: runstate(area) == "shutdown")
    assert "`vml stop` ends it" in vml("--repo", repo.path, "status", area)
    assert stop(area).how == "powered off"
    _saved_from_kept(repo, area, tmp_path, KEPT)


def test_the_keeper_waits_for_the_area_lock_and_keeps_nothing_twice(
    lab: tuple[Repository, Path], tmp_path: Path
) -> None:
    """Whoever holds the area lock (``vml stop``) keeps the ranges; the keeper, after it, finds QEMU gone."""
    repo, area, pid = _started(lab)
    spec = find_spec(area)
    assert spec is not None
    with lock_area(area):  # as `vml stop` (or a save being written) holds it
        power_off_inside(area)
        _wait_for("QEMU did not pause", lambda: runstate(area) == "shutdown")
        with QMPClient.connect(RunPaths(area).qmp) as c:
            assert dirty.keep_at_stop(c, area, spec) == []
            first = bitmaps.load_records(area)[RAW]
            assert dirty.keep_at_stop(c, area, spec) == []  # kept already: left as it is
            assert bitmaps.load_records(area)[RAW] == first
            assert keep_and_quit(c, area, spec) == []
        wait_ended(area)
        assert keeper_pid(area) == pid  # waiting for the lock
    _wait_for("the keeper did not end", lambda: keeper_pid(area) is None)
    assert bitmaps.load_records(area)[RAW] == first and _kept(area) == KEPT
    e2 = commit(repo, area)
    assert e2.notes == []
    raw._same_disk(repo, e2, tmp_path, area)


def test_a_vm_without_raw_disks_gets_no_keeper(tmp_path: Path) -> None:
    """Nothing new runs for it: no second socket, no process."""
    for tool in ("qemu-system-x86_64", "qemu-img"):
        need(tool)
    area = tmp_path / "lab"
    area.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(area / "d.qcow2"), "8M"], check=True
    )
    vm_init(area, disks=[area / "d.qcow2"], memory="16M", network="none")
    res = run(area, accel="tcg")
    try:
        assert res.command.count("-qmp") == 1 and res.notes == []
        assert keeper_pid(area) is None
        assert not RunPaths(area).keeper_qmp.exists() and not RunPaths(area).keeper_lock.exists()
    finally:
        stop(area, force_kill=True)
