"""Live saves of a QEMU that VML did not start (``vml commit --qmp``) and of libvirt domains.

Real QEMU and a real libvirt daemon (``tests/libvirtd.py``), with an empty
disk: SeaBIOS finds nothing to boot and waits, a running VM all the same
(the real Linux guest is in ``tests/guest``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_cli import vml
from tests.cli.test_vm_run import ROOT, _kill_vm
from tests.conftest import TEST_BLOCK, need
from tests.libvirtd import destroy, disks, domain, domain_xml, libvirt_uri, state
from tests.reliability.helpers import git_fsck, snapshot
from vml.plumbing.vm.qemu import run_status
from vml.plumbing.vm.qmp import QMPClient, is_listening

__all__ = ["libvirt_uri"]  # the fixture


def user_qemu(area: Path, sock: Path, disk: Path) -> subprocess.Popen[bytes]:
    """A QEMU started the user's way: their command line, their QMP socket."""
    need("qemu-system-x86_64")
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-name", "lab", "-machine", "q35", "-accel", "tcg", "-m", "16",
         "-nodefaults", "-display", "none", "-drive", f"file={disk},format=raw,if=virtio",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not is_listening(sock):
        assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
        time.sleep(0.05)
    return proc


def qmp_state(sock: Path) -> str:
    with QMPClient.connect(sock) as c:
        return str(c.execute("query-status")["status"])


def qmp_images(sock: Path) -> list[str]:
    with QMPClient.connect(sock) as c:
        return [d["inserted"]["file"] for d in c.execute("query-block") if "inserted" in d]


#: ``vml commit`` that stops for good while it saves (the guest runs on its overlays).
SAVER = """
import sys, time
import vml.porcelain.commit as commit
def stuck(*args, **kw):
    print("SAVING", flush=True)
    time.sleep(600)
commit._commit_locked = stuck
from vml.cli.app import main
sys.argv = ["vml", *sys.argv[1:]]
main()
"""


def kill_saver_while_saving(repo: Path, area: Path, *args: object) -> None:
    """Run ``vml commit`` of ``area`` and kill -9 it while it reads the frozen images."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, "--repo", str(repo), "commit", str(area), "-q",
         *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"SAVING\n", (line, proc.communicate())
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Path]:
    area = tmp_path / "lab"
    area.mkdir()
    with open(area / "disk.img", "wb") as f:
        f.truncate(1 << 20)
        f.write(b"boot sector of sorts")
    yield area


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    return repo


def test_qmp_save_is_live_and_its_checkout_resumes(lab: Path, repo: Path, tmp_path: Path) -> None:
    sock = tmp_path / "user.sock"
    proc = user_qemu(lab, sock, lab / "disk.img")
    copy = tmp_path / "copy"
    try:
        out = vml("--repo", repo, "commit", lab, "--qmp", sock, "-m", "live")
        assert "full entry E1" in out and "saved running through QMP, guest paused" in out
        assert qmp_state(sock) == "running"  # it went on
        assert qmp_images(sock) == [str(lab / "disk.img")]  # back on its image
        assert not (lab / ".vml" / "overlays").exists()
        shown = json.loads(vml("--repo", repo, "show", "E1", "--json"))
        live = shown["vm"]["live"]
        assert live["via"] == "qmp" and live["state_file"] == "lab.migstream"
        assert live["resume_file"] == "lab.resume.json" and live["pause_seconds"] > 0
        assert shown["vm"]["crash_consistent"] is False
        files = {f["path"] for f in shown["files"]}
        assert files == {"disk.img", "lab.migstream", "lab.resume.json"}
        assert "running, consistent" in vml("--repo", repo, "log")
        status = vml("--repo", repo, "status", lab)
        assert "holds E1 (saved running through qmp, consistent)" in status
        assert "lab.migstream" not in status  # not in the area, and not lost
        assert not (lab / ".vml" / "stage").exists()

        out = vml("--repo", repo, "checkout", "E1", copy)
        assert "saved live through qmp" in out and f"`vml run {copy}` resumes it" in out
        assert "suspended" in vml("--repo", repo, "status", copy)
        dry = vml("run", copy, "--dry-run")
        assert f"file={copy}/disk.img" in dry and "-incoming defer" in dry
        assert str(sock) not in dry  # the user's socket gives way to VML's own
    finally:
        proc.kill()
        proc.wait()
    try:
        assert "resumed the VM" in vml("run", copy)
        assert run_status(copy)["state"] == "running"  # type: ignore[index]
        assert not (copy / "lab.migstream").exists() and not (copy / "lab.resume.json").exists()
        # Under `vml run` now, without a description: saved live again, through its socket.
        out = vml("--repo", repo, "commit", copy, "-m", "again")
        assert "incremental entry E2" in out and "through QMP" in out
        assert "running under vml run now" in vml("--repo", repo, "areas")
        assert "killed" in vml("stop", copy, "--kill")
    finally:
        _kill_vm(copy)
    git_fsck(repo)


def test_qmp_saves_refused_change_nothing(lab: Path, repo: Path, tmp_path: Path) -> None:
    sock = tmp_path / "user.sock"
    outside = tmp_path / "scratch.img"
    outside.write_bytes(b"\0" * 65536)
    proc = user_qemu(lab, sock, outside)
    try:
        before = snapshot(lab)
        line = vml("--repo", repo, "commit", lab, "--qmp", sock, code=5)
        assert "outside the area" in line and str(outside) in line
        assert snapshot(lab) == before and qmp_state(sock) == "running"
        line = vml("--repo", repo, "commit", lab, "--qmp", sock, "--force-running", code=2)
        assert "exclude each other" in line
        with QMPClient.connect(sock) as c:
            c.execute("stop")
        line = vml("--repo", repo, "commit", lab, "--qmp", sock, code=10)
        assert "paused" in line and "vml run --continue --qmp" in line
        assert "continues" in vml("run", lab, "--continue", "--qmp", sock)
        assert qmp_state(sock) == "running"
        assert json.loads(vml("--repo", repo, "log", "--all", "--json")) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_qmp_save_killed_while_saving_leaves_the_guest_running_and_is_mended(
    lab: Path, repo: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "user.sock"
    proc = user_qemu(lab, sock, lab / "disk.img")
    try:
        kill_saver_while_saving(repo, lab, "--qmp", sock)
        # The guest runs on, on an overlay; the area's image is as at the pause.
        assert qmp_state(sock) == "running"
        [image] = qmp_images(sock)
        assert Path(image).parent == (lab / ".vml" / "overlays").resolve()
        assert json.loads(vml("--repo", repo, "log", "--all", "--json")) == []
        git_fsck(repo)
        # The next save merges it back first.
        assert "full entry E1" in vml("--repo", repo, "commit", lab, "--qmp", sock)
        assert qmp_images(sock) == [str(lab / "disk.img")]
        assert not Path(image).exists() and not (lab / ".vml" / "overlays").exists()
    finally:
        proc.kill()
        proc.wait()


# --- libvirt ---------------------------------------------------------------------------


def test_libvirt_domain_is_saved_through_libvirt_and_resumed_elsewhere(
    lab: Path, repo: Path, tmp_path: Path, libvirt_uri: str
) -> None:
    need("qemu-system-x86_64")
    name = f"vml-test-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "dom.xml").write_text(domain_xml(name, lab, "disk.img"))
    copy = tmp_path / "copy"
    with domain(libvirt_uri, tmp_path / "dom.xml"):
        # A domain is found by its disks: no option needed.
        out = vml("--repo", repo, "commit", lab, "-m", "libvirt")
        assert "full entry E1" in out and "saved running through libvirt, guest paused" in out
        assert state(libvirt_uri, name) == "running"
        assert disks(libvirt_uri, name) == [str(lab / "disk.img")]  # back on its image
        assert not (lab / ".vml" / "overlays").exists() and not (lab / ".vml" / "stage").exists()
        shown = json.loads(vml("--repo", repo, "show", "E1", "--json"))
        live = shown["vm"]["live"]
        assert live["via"] == "libvirt" and live["domain"] == name
        stem = live["state_file"].removesuffix(".libvirt-save")
        assert {f["path"] for f in shown["files"]} == {
            "disk.img",
            "console.log",
            f"{stem}.libvirt-save",
            f"{stem}.resume.json",
        }
        vml("--repo", repo, "checkout", "E1", copy)
        # The same domain (name, UUID) runs: the copy cannot run beside it.
        line = vml("run", copy, code=6)
        assert f"virsh destroy {name}" in line
        assert (copy / f"{stem}.libvirt-save").exists()
    assert state(libvirt_uri, name) == ""
    try:
        out = vml("run", copy)
        assert f"as libvirt domain {name}" in out
        assert state(libvirt_uri, name) == "running"
        assert disks(libvirt_uri, name) == [str(copy / "disk.img")]
        assert not (copy / f"{stem}.libvirt-save").exists()
    finally:
        destroy(libvirt_uri, name)
    git_fsck(repo)


def test_a_libvirt_save_killed_while_saving_is_mended_by_the_next(
    lab: Path, repo: Path, tmp_path: Path, libvirt_uri: str
) -> None:
    need("qemu-system-x86_64")
    name = f"vml-test-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "dom.xml").write_text(domain_xml(name, lab, "disk.img"))
    with domain(libvirt_uri, tmp_path / "dom.xml"):
        kill_saver_while_saving(repo, lab)
        assert state(libvirt_uri, name) == "running"
        [image] = disks(libvirt_uri, name)
        assert Path(image).parent == lab / ".vml" / "overlays"
        assert json.loads(vml("--repo", repo, "log", "--all", "--json")) == []
        assert "full entry E1" in vml("--repo", repo, "commit", lab)
        assert disks(libvirt_uri, name) == [str(lab / "disk.img")]
        assert not Path(image).exists()


# --- a resume file from someone else ---------------------------------------------------


def _saved(area: Path, command: list[str], cwd: str = "") -> None:
    """A QMP save's files in ``area``, as a checkout writes them (the state is not read)."""
    (area / "lab.migstream").write_bytes(b"QEVM")
    doc = {"vml_resume": 1, "via": "qmp", "state": "lab.migstream", "area": "/vms/lab",
           "saved": "2026-01-01T00:00:00Z", "qemu": "1.0.0", "machine": "pc", "accel": "tcg",
           "command": command, "cwd": cwd}  # fmt: skip
    (area / "lab.resume.json").write_text(json.dumps(doc))


def test_a_resume_file_that_would_run_another_program_or_touch_other_files_is_refused(
    lab: Path, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    cases = [
        (["/bin/sh", "-c", f"touch {ran}"], 7, "not a QEMU"),
        (["qemu-system-x86_64", "-drive", f"file={tmp_path}/other.img"], 5, "outside the area"),
        (["qemu-system-x86_64", "-drive", "file=vms/lab/disk.img"], 5, "outside the area"),
    ]
    for command, code, says in cases:
        _saved(lab, command, cwd=str(tmp_path))
        line = vml("run", lab, code=code)
        assert says in line
        assert vml("run", lab, "--dry-run", code=code) == line
        assert not ran.exists() and not (lab / ".vml" / "run").exists()
        assert (lab / "lab.resume.json").exists() and (lab / "lab.migstream").exists()
