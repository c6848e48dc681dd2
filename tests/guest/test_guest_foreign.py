"""The real Linux guest saved live by VML though VML did not start it.

- a QEMU the test starts itself, its own command line and QMP socket:
  ``vml commit --qmp SOCKET`` while it works, then the entry checked out
  elsewhere resumes under ``vml run`` (that command line again);
- a libvirt domain (``tests/libvirtd.py`` starts the daemon): ``vml commit``
  finds it by its disks and saves it through libvirt, the entry checked out
  elsewhere resumes through ``virsh restore``.

Either way the resumed guest carries on with the same boot id and a larger
uptime, finishes its work sessions, powers off, and its file system is
clean.  The console is a file of the area, appended to, so the checkout's
copy of it goes on where the save left it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli.test_cli import vml
from tests.cli.test_vm_run import _kill_vm
from tests.conftest import TEST_BLOCK, need
from tests.guest.build import Guest
from tests.guest.test_guest import MARK, WAIT, fsck_clean, guest
from tests.libvirtd import destroy, domain, domain_xml, libvirt_uri, state
from tests.reliability.helpers import git_fsck
from vml.plumbing.vm.qemu import RunPaths, vml_vm
from vml.plumbing.vm.qmp import is_listening

pytestmark = pytest.mark.guest
__all__ = ["guest", "libvirt_uri"]  # fixtures

SESSIONS = 2


def marks(console: Path) -> list[tuple[str, str, float]]:
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return []
    return [(m[1], m[2], float(m[3])) for m in MARK.finditer(text)]


def wait_mark(console: Path, pattern: str, after: int = 0) -> int:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        seen = marks(console)
        if any(re.search(pattern, what) for what, _, _ in seen[after:]):
            return len(seen)
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {WAIT} s: {marks(console)[-3:]}")


def wait_until(done: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def guest_files(guest: Guest, area: Path) -> None:
    area.mkdir()
    subprocess.run(["cp", "--sparse=always", str(guest.root), str(area / "root.img")], check=True)
    shutil.copy(guest.kernel, area / "vmlinuz")
    shutil.copy(guest.initrd, area / "initrd.gz")


def check_resumed(
    before: list[tuple[str, str, float]], after: list[tuple[str, str, float]]
) -> None:
    """The resumed guest is the one saved: same boot, uptime on, its sessions finished."""
    boot = before[0][1]
    new = after[len(before) :]
    assert new and all(b == boot for _, b, _ in after), "the guest rebooted"
    assert not any(w.startswith("boot") for w, _, _ in new)
    assert new[0][2] >= before[-1][2]
    assert any(w == f"all-done sessions={SESSIONS}" for w, _, _ in new)
    assert new[-1][0] == "poweroff"


def test_a_qemu_of_its_own_saved_through_qmp_resumes_elsewhere(
    guest: Guest, tmp_path: Path
) -> None:
    area, copy, repo = tmp_path / "physics", tmp_path / "copy", tmp_path / "repo"
    guest_files(guest, area)
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    sock = tmp_path / "user.sock"
    console = f"file,id=con,path={area / 'console.log'},append=on"
    user = subprocess.Popen(
        ["qemu-system-x86_64", "-name", "physics", "-machine", "q35", "-accel", "tcg",
         "-m", "128", "-nodefaults", "-display", "none", "-no-reboot",
         "-kernel", str(area / "vmlinuz"), "-initrd", str(area / "initrd.gz"),
         "-append", guest.append(sessions=SESSIONS, pause=1),
         "-drive", f"file={area / 'root.img'},format=raw,if=virtio",
         "-chardev", console, "-serial", "chardev:con",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: is_listening(sock), "QEMU did not open its QMP socket")
        n = wait_mark(area / "console.log", r"session=1 start")
        out = vml("--repo", repo, "commit", area, "--qmp", sock, "-m", "working")
        assert "saved running through QMP" in out
        wait_mark(area / "console.log", r".", after=n)  # it went on
    finally:
        user.kill()
        user.wait()
    vml("--repo", repo, "checkout", "E1", copy)
    before = marks(copy / "console.log")
    try:
        assert "resumed the VM" in vml("run", copy)
        wait_until(lambda: RunPaths(copy).exit.exists(), "the guest did not power off")
    finally:
        _kill_vm(copy)
    assert vml_vm(copy) is None
    check_resumed(before, marks(copy / "console.log"))
    fsck_clean(copy / "root.img")
    git_fsck(repo)


def test_a_libvirt_domain_saved_while_it_works_resumes_elsewhere(
    guest: Guest, tmp_path: Path, libvirt_uri: str
) -> None:
    need("qemu-system-x86_64")
    area, copy, repo = tmp_path / "physics", tmp_path / "copy", tmp_path / "repo"
    guest_files(guest, area)
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    name = f"vml-guest-{os.getpid()}-{time.monotonic_ns()}"
    boot = ("vmlinuz", "initrd.gz", guest.append(sessions=SESSIONS, pause=1))
    (tmp_path / "dom.xml").write_text(domain_xml(name, area, "root.img", 128, boot))
    with domain(libvirt_uri, tmp_path / "dom.xml"):
        n = wait_mark(area / "console.log", r"session=1 start")
        out = vml("--repo", repo, "commit", area, "-m", "working")
        assert "saved running through libvirt" in out
        wait_mark(area / "console.log", r".", after=n)  # it went on
    vml("--repo", repo, "checkout", "E1", copy)
    before = marks(copy / "console.log")
    try:
        assert f"as libvirt domain {name}" in vml("run", copy)
        # It powers off at the end of its sessions: a transient domain is then gone.
        wait_until(lambda: state(libvirt_uri, name) == "", "the guest did not power off")
    finally:
        destroy(libvirt_uri, name)
    check_resumed(before, marks(copy / "console.log"))
    fsck_clean(copy / "root.img")
    git_fsck(repo)
