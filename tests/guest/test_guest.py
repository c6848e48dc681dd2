"""A real Linux guest under a real qemu-system-x86_64 (TCG): live saves, resume, stop.

The guest (``tests/guest/build.py``) prints ``VML-MARK`` lines with its boot
id and uptime on the serial console, which ``vml run`` logs to
``.vml/run/console.log``: a resumed guest goes on with the same boot id and
a larger uptime; a rebooted one would print ``boot`` again.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_cli import vml
from tests.cli.test_vm_run import _kill_vm, kill_saver_in_pause
from tests.conftest import TEST_BLOCK, allocated, need
from tests.guest.build import Guest, GuestUnavailable, build_guest
from tests.porcelain.test_keeper import kill_keeper_and_watcher
from tests.reliability.helpers import git_fsck
from vml.plumbing.areas import keeper_pid
from vml.plumbing.vm import bitmaps
from vml.plumbing.vm.qemu import RunPaths, run_status, vml_vm
from vml.plumbing.vm.qmp import QMPClient

pytestmark = pytest.mark.guest

MARK = re.compile(r"VML-MARK (.*?) boot=(\S+) uptime=([\d.]+)")
WAIT = 240.0  # TCG on two busy cores: generous, never a timing assertion


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The built guest (cached between runs), or a skip saying why it cannot be built."""
    need("qemu-system-x86_64")
    need("e2fsck")
    try:
        return build_guest()
    except GuestUnavailable as e:
        pytest.skip(f"the real guest cannot be built here: {e}")


def marks(area: Path) -> list[tuple[str, str, float]]:
    """The guest's markers so far: (what, boot id, uptime)."""
    try:
        text = RunPaths(area).console.read_text(errors="replace")
    except OSError:
        return []
    return [(m[1], m[2], float(m[3])) for m in MARK.finditer(text)]


def wait_mark(area: Path, pattern: str, after: int = 0) -> int:
    """Wait for a marker matching ``pattern`` among markers ``after`` on; return how many there are."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        seen = marks(area)
        if any(re.search(pattern, what) for what, _, _ in seen[after:]):
            return len(seen)
        if vml_vm(area) is None and not any(
            re.search(pattern, w) for w, _, _ in marks(area)[after:]
        ):
            raise AssertionError(f"the VM ended before {pattern!r}: {seen[-3:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {WAIT} s: {marks(area)[-3:]}")


def wait_off(area: Path) -> None:
    deadline = time.monotonic() + WAIT
    while vml_vm(area) is not None or not RunPaths(area).exit.exists():
        assert time.monotonic() < deadline, "the guest did not power off"
        time.sleep(0.1)


def fsck_clean(image: Path) -> None:
    done = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def guest_area(guest: Guest, tmp_path: Path) -> Iterator[Path]:
    """An area holding the guest: its root disk, and a description booting it for 4 sessions."""
    area = tmp_path / "physics"
    area.mkdir()
    subprocess.run(["cp", "--sparse=always", str(guest.root), str(area / "root.img")], check=True)
    vml(
        "vm", "init", area, "--disk", area / "root.img", "--memory", "128M",
        "--kernel", guest.kernel, "--initrd", guest.initrd,
        "--append", guest.append(sessions=4, pause=1), "--network", "none",
        "--qemu-arg=-no-reboot",
    )  # fmt: skip
    yield area
    _kill_vm(area)


def test_live_saves_resume_elsewhere_where_the_guest_was(guest_area: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    assert "started the VM" in vml("run", guest_area, "--accel", "tcg")
    n = wait_mark(guest_area, r"session=1 start")
    boot = marks(guest_area)[0][1]

    # Two live saves while the guest works; it keeps running between them.
    out = vml("--repo", repo, "commit", guest_area, "-m", "working")
    assert "full entry E1" in out and "crash-consistent" not in out
    n = wait_mark(guest_area, r".", after=n)  # a new marker: it went on
    n = wait_mark(guest_area, r"session=\d+ (untarred|compressed|done)", after=n)
    before = marks(guest_area)
    out = vml("--repo", repo, "commit", guest_area, "-m", "still working")
    assert "incremental entry E2" in out
    wait_mark(guest_area, r".", after=len(marks(guest_area)))
    assert vml_vm(guest_area) is not None
    _kill_vm(guest_area)
    log = vml("--repo", repo, "log")
    assert log.count("running, consistent") == 2

    # The second save, checked out elsewhere, resumes where it was.
    copy = tmp_path / "copy"
    out = vml("--repo", repo, "checkout", "E2", copy)
    assert "resumes it" in out
    try:
        assert "resumed the VM" in vml("run", copy)
        wait_mark(copy, r"all-done")
        wait_off(copy)
    finally:
        _kill_vm(copy)
    after = marks(copy)
    assert after and all(b == boot for _, b, _ in after), "the guest rebooted"
    assert not any(what.startswith("boot") for what, _, _ in after)
    # Its uptime continues from the save (markers printed before the pause are earlier).
    assert after[0][2] >= before[-1][2]
    last_session = max(int(m) for w, _, _ in before for m in re.findall(r"session=(\d+)", w))
    first_session = int(re.findall(r"session=(\d+)", after[0][0])[0])
    assert first_session >= last_session
    assert after[-1][0] == "poweroff" and any(w == "all-done sessions=4" for w, _, _ in after)
    assert not (copy / "physics.ram").exists() and not (copy / "physics.vmstate").exists()
    fsck_clean(copy / "root.img")


def _run_endless(guest_area: Path, tmp_path: Path, *, reboot: bool = False) -> tuple[Path, int]:
    """A new repository, and the guest run until its first session starts; returns both (and its mark).

    The guest as a VM of 128 MiB that works in sessions until powered off
    (none counted); a reboot ends QEMU (``-no-reboot``) unless ``reboot``.
    """
    repo = tmp_path / "repo"
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    vml(
        "vm", "init", guest_area, "--disk", guest_area / "root.img", "--memory", "128M",
        "--kernel", guest_area / "vmlinuz", "--initrd", guest_area / "initrd.gz",
        "--append", "console=ttyS0 quiet panic=-1 vml.sessions=0 vml.pause=0.5",
        "--network", "none", *([] if reboot else ["--qemu-arg=-no-reboot"]), "--force",
    )  # fmt: skip
    vml("run", guest_area, "--accel", "tcg")
    return repo, wait_mark(guest_area, r"session=1 start")


def test_a_killed_saver_leaves_the_guest_paused_and_recoverable(
    guest_area: Path, tmp_path: Path
) -> None:
    repo, _ = _run_endless(guest_area, tmp_path)
    kill_saver_in_pause(repo, guest_area)
    state = run_status(guest_area)
    assert state is not None and state["state"] in ("paused", "postmigrate")
    assert "vml run --continue" in vml("--repo", repo, "status", guest_area)
    seen = len(marks(guest_area))
    time.sleep(1)
    assert len(marks(guest_area)) == seen  # paused: the guest prints nothing
    assert vml("--repo", repo, "log", "--all", "--json").strip() == "[]"
    git_fsck(repo)
    assert "continues" in vml("run", guest_area, "--continue")
    wait_mark(guest_area, r".", after=seen)
    # The ACPI power button: the guest ends its session and powers off cleanly.
    out = vml("stop", guest_area, "--timeout", str(WAIT))
    assert "powered off" in out
    assert marks(guest_area)[-1][0] == "poweroff"
    assert not (guest_area / "physics.ram").exists()
    fsck_clean(guest_area / "root.img")


def test_a_powered_off_raw_disk_is_saved_through_the_ranges_stop_kept(
    guest_area: Path, tmp_path: Path
) -> None:
    """``vml stop`` (the power button) keeps the raw disk's dirty ranges: the save reads only them."""
    repo, n = _run_endless(guest_area, tmp_path)
    vml("--repo", repo, "commit", guest_area, "-m", "working")  # live: the bitmap counts from here
    wait_mark(guest_area, r"session=\d+ done", after=n)
    assert "powered off" in vml("stop", guest_area, "--timeout", str(WAIT))
    assert marks(guest_area)[-1][0] == "poweroff"
    rec = bitmaps.load_records(guest_area)["root.img"]
    kept = bitmaps.read_kept(guest_area, rec, rec.kept)
    dirty = sum(b - a for a, b in kept)
    disk = guest_area / "root.img"
    assert 0 < dirty < allocated(disk) // 2
    res = json.loads(vml("--repo", repo, "commit", guest_area, "-m", "off", "--json"))
    assert res["notes"] == []
    assert res["read_bytes"] <= dirty + (1 << 20)  # the kept ranges (and the description)
    copy = tmp_path / "copy"
    vml("--repo", repo, "checkout", res["entry"], copy)
    assert filecmp.cmp(copy / "root.img", disk, shallow=False)
    fsck_clean(copy / "root.img")

    # Without its keeper (it and its shell killed), a `vml stop` interrupted
    # once the guest was off leaves QEMU paused in `shutdown` (done here by
    # hand); `vml stop` again keeps the ranges and ends it.
    vml("run", guest_area, "--accel", "tcg")
    n = wait_mark(guest_area, r"session=1 start")
    wait_mark(guest_area, r"session=\d+ done", after=n)
    kill_keeper_and_watcher(guest_area)
    with QMPClient.connect(RunPaths(guest_area).qmp) as c:
        c.execute("set-action", {"shutdown": "pause"})
        c.execute("system_powerdown")
        deadline = time.monotonic() + WAIT
        while c.execute("query-status").get("status") != "shutdown":
            assert time.monotonic() < deadline, "the guest did not power off"
            time.sleep(0.1)
    assert vml_vm(guest_area) is not None  # paused, not ended
    assert "powered off" in vml("stop", guest_area)
    wait_off(guest_area)
    rec = bitmaps.load_records(guest_area)["root.img"]
    assert rec.since == res["commit"]
    dirty = sum(b - a for a, b in bitmaps.read_kept(guest_area, rec, rec.kept))
    res = json.loads(vml("--repo", repo, "commit", guest_area, "-m", "off again", "--json"))
    assert res["notes"] == [] and res["read_bytes"] <= dirty + (1 << 20)
    again = tmp_path / "again"
    vml("--repo", repo, "checkout", res["entry"], again)
    assert filecmp.cmp(again / "root.img", disk, shallow=False)


def _press_power_button(area: Path) -> None:
    """The ACPI power button, pressed at QEMU itself (not `vml stop`): the guest powers itself off."""
    with QMPClient.connect(RunPaths(area).qmp) as c:
        c.execute("system_powerdown")


def _saved_at_rest_from_kept_ranges(area: Path, repo: Path, tmp_path: Path, first: str) -> None:
    """A save now reads only the kept ranges, and holds what a save reading the disk whole holds."""
    rec = bitmaps.load_records(area)["root.img"]
    assert rec.since == first
    dirty = sum(b - a for a, b in bitmaps.read_kept(area, rec, rec.kept))
    disk = area / "root.img"
    assert 0 < dirty < allocated(disk) // 2
    res = json.loads(vml("--repo", repo, "commit", area, "-m", "off", "--json"))
    assert res["notes"] == []
    assert res["read_bytes"] <= dirty + (1 << 20)  # the kept ranges (and the description)
    full = json.loads(vml("--repo", repo, "commit", area, "--full", "--allow-empty", "--json"))
    assert full["read_bytes"] >= allocated(disk) // 2
    for entry in (res["entry"], full["entry"]):
        vml("--repo", repo, "checkout", entry, tmp_path / entry)
        assert filecmp.cmp(tmp_path / entry / "root.img", disk, shallow=False)


def test_a_guest_that_powers_itself_off_keeps_the_raw_disks_ranges(
    guest_area: Path, tmp_path: Path
) -> None:
    """Nothing of `vml stop` runs: the keeper `vml run` started keeps them, then ends QEMU."""
    repo, n = _run_endless(guest_area, tmp_path)
    first = json.loads(vml("--repo", repo, "commit", guest_area, "-m", "working", "--json"))
    wait_mark(guest_area, r"session=\d+ done", after=n)
    _press_power_button(guest_area)
    wait_off(guest_area)
    assert marks(guest_area)[-1][0] == "poweroff"
    assert "keeping the raw disks' dirty ranges" in RunPaths(guest_area).keeper_log.read_text()
    _saved_at_rest_from_kept_ranges(guest_area, repo, tmp_path, first["commit"])
    fsck_clean(guest_area / "root.img")


def test_a_reboot_inside_the_guest_ends_nothing(guest_area: Path, tmp_path: Path) -> None:
    """A reboot (the guest's write to the reset control register) is no power-off: all goes on."""
    repo, n = _run_endless(guest_area, tmp_path, reboot=True)
    first = json.loads(vml("--repo", repo, "commit", guest_area, "-m", "working", "--json"))
    n = wait_mark(guest_area, r"session=\d+ done", after=n)
    keeper = keeper_pid(guest_area)
    boot = marks(guest_area)[0][1]
    with QMPClient.connect(RunPaths(guest_area).qmp) as c:
        c.execute("human-monitor-command", {"command-line": "o /b 0xcf9 0x06"})
        assert c.wait_event("RESET", WAIT) is not None
    n = wait_mark(guest_area, r"^boot", after=n)
    assert {b for _, b, _ in marks(guest_area)} > {boot}  # rebooted, not ended
    n = wait_mark(guest_area, r"session=\d+ done", after=n)
    assert vml_vm(guest_area) is not None and keeper_pid(guest_area) == keeper
    _press_power_button(guest_area)
    wait_off(guest_area)
    assert marks(guest_area)[-1][0] == "poweroff"
    _saved_at_rest_from_kept_ranges(guest_area, repo, tmp_path, first["commit"])


def test_a_killed_keeper_loses_the_ranges_and_the_guest_still_powers_off(
    guest_area: Path, tmp_path: Path
) -> None:
    repo, n = _run_endless(guest_area, tmp_path)
    vml("--repo", repo, "commit", guest_area, "-m", "working")
    wait_mark(guest_area, r"session=\d+ done", after=n)
    pid = keeper_pid(guest_area)
    assert pid
    os.kill(pid, signal.SIGKILL)
    _press_power_button(guest_area)
    wait_off(guest_area)  # QEMU did not stay paused
    assert marks(guest_area)[-1][0] == "poweroff"
    res = json.loads(vml("--repo", repo, "commit", guest_area, "-m", "off", "--json"))
    assert len(res["notes"]) == 1 and "read whole" in res["notes"][0]
    assert "killed or crashed, or so was their keeper" in res["notes"][0]
    vml("--repo", repo, "checkout", res["entry"], tmp_path / "copy")
    assert filecmp.cmp(tmp_path / "copy" / "root.img", guest_area / "root.img", shallow=False)
