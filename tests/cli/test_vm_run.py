"""``vml vm init``, ``vml run``, ``vml stop`` and live saves with a real QEMU.

The VM here has an empty disk: SeaBIOS finds nothing to boot and waits, which
is all a test of starting, pausing, saving, resuming and stopping QEMU
needs (the real Linux guest is in ``tests/guest``).  It ignores the ACPI
power button, which lets the "did not power off" path be tested too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_cli import vml
from tests.conftest import TEST_BLOCK, need, qemu_io_open
from tests.reliability.helpers import git_fsck
from vml.errors import VMRunning
from vml.plumbing.vm.inspect import check_saveable
from vml.plumbing.vm.live import live_snapshot
from vml.plumbing.vm.qemu import RunPaths, run_status, vml_vm
from vml.plumbing.vm.qmp import QMPClient

ROOT = Path(__file__).resolve().parents[2]


def _kill_vm(area: Path) -> None:
    try:
        pid = int(RunPaths(area).pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass


@pytest.fixture
def vm_area(tmp_path: Path) -> Iterator[Path]:
    """An area with an empty 1 MiB raw disk and a 16 MiB VM described for it."""
    area = tmp_path / "lab"
    area.mkdir()
    with open(area / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    out = vml(
        "vm", "init", area, "--disk", area / "disk.img", "--memory", "16M", "--network", "none"
    )
    assert "wrote lab.qemu.json" in out and "16.0 MiB of memory" in out
    yield area
    _kill_vm(area)


def test_init_writes_a_description_inspection_reads(vm_area: Path) -> None:
    doc = json.loads((vm_area / "lab.qemu.json").read_text())
    assert doc["disks"] == [{"path": "disk.img", "format": "raw", "interface": "virtio"}]
    assert doc["memory_mib"] == 16 and doc["machine"] == "q35"
    from vml.plumbing.vm.inspect import inspect_area

    info = inspect_area(vm_area)
    assert (info.hypervisor, info.name, info.memory_mib, info.config) == (
        "qemu",
        "lab",
        16,
        "lab.qemu.json",
    )
    line = vml("vm", "init", vm_area, "--disk", vm_area / "disk.img", code=5)
    assert "has a VM description already" in line and "--force" in line
    vml("vm", "init", vm_area, "--disk", vm_area / "disk.img", "--force", "--name", "lab2")
    assert not (vm_area / "lab.qemu.json").exists() and (vm_area / "lab2.qemu.json").exists()


def test_init_refusals_change_nothing(tmp_path: Path) -> None:
    area = tmp_path / "a"
    area.mkdir()
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"\0" * 4096)
    (area / "d.vmdk").write_text('# Disk DescriptorFile\ncreateType="monolithicFlat"\n')
    (area / "d.img").write_bytes(b"\0" * 4096)
    for args, code, what in [
        (["--disk", outside], 5, "outside the area"),
        (["--disk", area / "nope.img"], 5, "does not exist"),
        (["--disk", area / "d.vmdk"], 5, "raw or qcow2"),
        ([], 2, "at least one disk"),
        (["--disk", area / "d.img", "--memory", "1.5G"], 2, "memory"),
        (["--disk", area / "d.img", "--display", "bogus"], 2, "display"),
        (["--disk", area / "d.img", "--initrd", outside], 2, "--kernel"),
        (["--disk", area / "d.img", "--kernel", outside, "--no-copy"], 5, "outside the area"),
    ]:
        line = vml("vm", "init", area, *args, code=code)
        assert what in line, line
    assert sorted(os.listdir(area)) == ["d.img", "d.vmdk"]
    out = vml("vm", "init", area, "--disk", area / "d.img", "--kernel", outside)
    assert "copied outside.img into the area" in out
    assert json.loads((area / "a.qemu.json").read_text())["kernel"] == "outside.img"


def test_run_without_a_description_says_how_to_write_one(tmp_path: Path) -> None:
    line = vml("run", tmp_path, code=5)
    assert "no QEMU VM description" in line and "vml vm init" in line
    # Nothing runs there: stop needs no description (a QEMU resumed from a
    # --qmp save has none), it says so.
    line = vml("stop", tmp_path, code=5)
    assert "no VM runs under `vml run`" in line and "nothing to stop" in line


def test_dry_run_prints_the_command_and_starts_nothing(vm_area: Path) -> None:
    need("qemu-system-x86_64")
    out = vml("run", vm_area, "--dry-run", "--accel", "tcg")
    assert out.startswith(("qemu-system-x86_64", "/")) and "-accel tcg" in out
    assert f"mem-path={vm_area}/lab.ram,share=on" in out
    assert not (vm_area / "lab.ram").exists() and vml_vm(vm_area) is None
    assert "unknown accelerator" in vml("run", vm_area, "--accel", "hvf", code=5)


def test_run_save_resume_continue_and_stop(vm_area: Path) -> None:
    need("qemu-system-x86_64")
    out = vml("run", vm_area, "--accel", "tcg")
    assert "started the VM" in out and "tcg" in out
    vm = vml_vm(vm_area)
    assert vm is not None and (vm_area / "lab.ram").stat().st_size == 16 << 20
    assert run_status(vm_area) == {"pid": vm.pid, "state": "running"}
    # Twice is refused; a plain save is refused naming the ways on.
    assert "already runs under `vml run`" in vml("run", vm_area, code=6)
    with pytest.raises(VMRunning, match="runs under `vml run`") as e:
        check_saveable(vm_area, force_running=False, include_external=False)
    assert "vml stop --save" in e.value.remedy
    # SeaBIOS ignores the power button: a clear message, and the VM runs on.
    line = vml("stop", vm_area, "--timeout", "1", code=10)
    assert "did not power off within 1 s" in line and "--kill" in line
    assert vml_vm(vm_area) is not None

    out = vml("stop", vm_area, "--save")
    assert "saved the running state" in out and "lab.vmstate" in out
    assert vml_vm(vm_area) is None
    assert (vm_area / "lab.vmstate").exists() and (vm_area / "lab.ram").exists()
    status = vml("--repo", vm_area.parent / "r", "status", vm_area, code=3)
    assert "no VML repository" in status

    out = vml("run", vm_area)  # resumes under the accelerator it was saved with
    assert "resumed the VM" in out
    assert not (vm_area / "lab.vmstate").exists()  # consumed: it cannot be resumed twice
    assert "was running already" in vml("run", vm_area, "--continue")
    with QMPClient.connect(RunPaths(vm_area).qmp) as c:
        c.execute("stop")
    assert run_status(vm_area)["state"] == "paused"  # type: ignore[index]
    assert "continues" in vml("run", vm_area, "--continue")
    assert run_status(vm_area)["state"] == "running"  # type: ignore[index]

    out = vml("stop", vm_area, "--kill")
    assert "killed" in out and vml_vm(vm_area) is None
    # A VM that is off keeps no memory file (its content would be garbage).
    assert not (vm_area / "lab.ram").exists()
    assert "no VM runs" in vml("stop", vm_area, code=5)


def test_a_state_this_qemu_cannot_load_is_refused_and_kept(vm_area: Path) -> None:
    need("qemu-system-x86_64")
    vml("run", vm_area, "--accel", "tcg")
    vml("stop", vm_area, "--save")
    state = vm_area / "lab.vmstate"
    doc = state.read_bytes()
    head, rest = doc.split(b"\n", 2)[1], doc.split(b"\n", 2)[2]
    meta = json.loads(head)
    state.write_bytes(
        b"VML-QEMU-STATE 1\n" + json.dumps({**meta, "qemu": "99.0.0"}).encode() + b"\n" + rest
    )
    line = vml("run", vm_area, code=10)
    assert "made by QEMU 99.0.0" in line and "--discard-state" in line
    assert state.exists() and vml_vm(vm_area) is None
    # A damaged stream: QEMU says so, VML says what to do, the state stays.
    state.write_bytes(doc[: len(doc) - len(rest)] + b"QEVM" + b"\0" * 64)
    line = vml("run", vm_area, code=10)
    assert "could not load the saved state" in line and state.exists()
    assert vml_vm(vm_area) is None
    out = vml("run", vm_area, "--discard-state")
    assert "started the VM" in out and not state.exists()


def test_a_vm_someone_else_runs_is_refused(vm_area: Path) -> None:
    need("qemu-io")
    need("qemu-system-x86_64")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(vm_area / "d.qcow2"), "1M"], check=True
    )
    vml(
        "vm",
        "init",
        vm_area,
        "--disk",
        vm_area / "d.qcow2",
        "--memory",
        "16M",
        "--force",
        "--network",
        "none",
    )
    with qemu_io_open(vm_area / "d.qcow2"):
        line = vml("run", vm_area, code=6)
        assert "looks running elsewhere" in line and "d.qcow2 is locked" in line
        with pytest.raises(VMRunning) as e:
            check_saveable(vm_area, force_running=False, include_external=False, live=True)
        assert "vml run" in e.value.remedy and "--force-running" in e.value.remedy


def test_live_snapshot_pauses_copies_and_continues(vm_area: Path) -> None:
    need("qemu-system-x86_64")
    vml("run", vm_area, "--accel", "tcg")
    with live_snapshot(vm_area) as snap:
        assert set(snap.files) == {"lab.ram", "lab.vmstate", "disk.img"}
        assert run_status(vm_area)["state"] == "running"  # type: ignore[index]
        staged = snap.files["lab.ram"]
        assert staged.read_bytes() == (vm_area / "lab.ram").read_bytes()[:0] + staged.read_bytes()
        assert staged.stat().st_size == 16 << 20
        assert snap.files["lab.vmstate"].read_bytes().startswith(b"VML-QEMU-STATE 1\n")
        assert 0 < snap.pause_seconds < 30
        assert snap.record()["state_file"] == "lab.vmstate"
        assert snap.header.machine.startswith("pc-q35-")
    assert not RunPaths(vm_area).stage.exists()
    assert not (vm_area / "lab.vmstate").exists()
    # Paused (as a killed save leaves it): refused with the way out.
    with QMPClient.connect(RunPaths(vm_area).qmp) as c:
        c.execute("stop")
    with pytest.raises(Exception, match="vml run --continue"), live_snapshot(vm_area):
        pass
    assert run_status(vm_area)["state"] == "paused"  # type: ignore[index]


def test_commit_of_a_running_vm_is_live_and_its_checkout_resumes(
    vm_area: Path, tmp_path: Path
) -> None:
    need("qemu-system-x86_64")
    repo = tmp_path / "repo"
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    vml("run", vm_area, "--accel", "tcg")
    out = vml("--repo", repo, "commit", vm_area, "-m", "live")
    assert "full entry E1" in out and "crash-consistent" not in out
    assert "; saved running, guest paused " in out.splitlines()[1]  # the summary line
    assert vml_vm(vm_area) is not None and run_status(vm_area)["state"] == "running"  # type: ignore[index]
    shown = json.loads(vml("--repo", repo, "show", "E1", "--json"))
    vm = shown["vm"]
    assert vm["crash_consistent"] is False and vm["power_state"] == "running"
    assert vm["live"]["state_file"] == "lab.vmstate" and vm["live"]["pause_seconds"] > 0
    assert "lab.vmstate" in [f["path"] for f in shown["files"]]
    assert "running, consistent" in vml("--repo", repo, "log")
    assert "holds E1 (saved running, consistent)" in vml("--repo", repo, "status", vm_area)
    # The running area does not count its consumed state as lost.
    assert "lab.vmstate" not in vml("--repo", repo, "status", vm_area)
    # Its files are QEMU's while it runs: no checkout over them.
    line = vml("--repo", repo, "restore", "E1", vm_area, "--force", code=6)
    assert "runs under `vml run`" in line and "vml stop" in line
    copy = tmp_path / "copy"
    out = vml("--repo", repo, "checkout", "E1", copy)
    assert "`vml run" in out and "resumes it" in out
    try:
        assert "resumed the VM" in vml("run", copy)
        assert run_status(copy)["state"] == "running"  # type: ignore[index]
    finally:
        _kill_vm(copy)


#: ``vml commit`` that stops for good in the middle of its pause, to be killed there.
SAVER = """
import sys, time
import vml.plumbing.vm.live as live
real = live.copy_sparse
def stuck(src, dst, **kw):
    n = real(src, dst, **kw)
    print("PAUSED", flush=True)
    time.sleep(600)
    return n
live.copy_sparse = stuck
from vml.cli.app import main
sys.argv = ["vml", *sys.argv[1:]]
main()
"""


def kill_saver_in_pause(repo: Path, area: Path) -> None:
    """Run ``vml commit`` of ``area`` and kill -9 it while the VM is paused."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, "--repo", str(repo), "commit", str(area), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"PAUSED\n", (line, proc.communicate())
    finally:
        proc.kill()
        proc.wait()


def test_a_saver_killed_in_the_pause_leaves_a_way_out(vm_area: Path, tmp_path: Path) -> None:
    need("qemu-system-x86_64")
    repo = tmp_path / "repo"
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    vml("run", vm_area, "--accel", "tcg")
    kill_saver_in_pause(repo, vm_area)
    assert run_status(vm_area)["state"] in ("paused", "postmigrate")  # type: ignore[index]
    status = vml("--repo", repo, "status", vm_area)
    assert "paused under `vml run`" in status and "vml run --continue" in status
    assert "vml run --continue" in vml("--repo", repo, "commit", vm_area, code=10)
    assert vml("--repo", repo, "log", "--all", "--json").strip() == "[]"  # no entry half-made
    git_fsck(repo)
    assert "continues" in vml("run", vm_area, "--continue")
    assert run_status(vm_area)["state"] == "running"  # type: ignore[index]
    assert "full entry E1" in vml("--repo", repo, "commit", vm_area)
    # The killed save's copies are gone with it.
    assert not RunPaths(vm_area).stage.exists()


def test_console_runs_in_the_foreground_until_qemu_ends(vm_area: Path) -> None:
    need("qemu-system-x86_64")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vml", "run", str(vm_area), "--console", "--accel", "tcg"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        head = b""
        while b"serial console follows" not in head:
            line = proc.stdout.readline()
            assert line, proc.communicate()
            head += line
        assert vml_vm(vm_area) is not None
        out, err = proc.communicate(b"\x01x", timeout=30)  # Ctrl-A X: QEMU quits
        out = head + out
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"serial console follows" in out and b"QEMU ended" in out
    assert vml_vm(vm_area) is None and not (vm_area / "lab.ram").exists()


def test_an_area_too_deep_for_a_unix_socket_runs_through_a_short_one(tmp_path: Path) -> None:
    need("qemu-system-x86_64")
    area = tmp_path / ("deep" * 10) / ("er" * 20) / "lab"
    area.mkdir(parents=True)
    with open(area / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    vml("vm", "init", area, "--disk", area / "disk.img", "--memory", "16M", "--network", "none")
    assert len(str(RunPaths(area).qmp)) > 107
    try:
        vml("run", area, "--accel", "tcg")
        assert RunPaths(area).qmp.is_symlink()
        assert run_status(area)["state"] == "running"  # type: ignore[index]
        assert "killed" in vml("stop", area, "--kill")
    finally:
        _kill_vm(area)


def test_a_libvirt_domain_in_the_area_is_run_as_its_description(tmp_path: Path) -> None:
    need("qemu-system-x86_64")
    area = tmp_path / "lv"
    area.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(area / "vm.qcow2"), "1M"], check=True
    )
    (area / "vm.xml").write_text(
        "<domain type='qemu'><name>physics</name><memory unit='MiB'>32</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{area}/vm.qcow2'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )
    out = vml("run", area, "--dry-run", "--accel", "tcg")
    assert f"mem-path={area}/physics.ram,share=on" in out and "-m 32M" in out
    assert f"file={area}/vm.qcow2,format=qcow2" in out and "-nic none" in out
