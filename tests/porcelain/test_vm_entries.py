"""What entries record about the VM: running saves refused or marked, outside files saved, notes."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need, qemu_io_open
from vml.errors import AreaError, VMRunning
from vml.plumbing import refs as refs_mod
from vml.plumbing.repository import Repository
from vml.plumbing.vm.inspect import running_reasons
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit
from vml.porcelain.log import log, show
from vml.porcelain.status import status

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vm"


def run(*args: str | Path, cwd: Path | None = None) -> str:
    return subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True, cwd=cwd
    ).stdout


def no_entries(repo: Repository) -> bool:
    return not refs_mod.read_refs(repo).entries


def test_vmware_lock_refuses_then_force_marks_crash_consistent(
    repo: Repository, area: Path
) -> None:
    (area / "vm.vmx.lck").mkdir()
    (area / "vm.vmx.lck" / "M12345.lck").write_text("lock")
    with pytest.raises(VMRunning, match=r"vm\.vmx\.lck") as exc:
        commit(repo, area)
    assert "--force-running" in exc.value.remedy
    assert no_entries(repo)
    res = commit(repo, area, force_running=True)
    assert res.crash_consistent
    vm = show(repo, res.entry).entry.vm
    assert vm is not None
    assert vm.info.power_state == "running" and vm.crash_consistent is True
    assert log(repo).entries[res.entry].vm == vm
    # The lock folder is never saved; a checkout says what the entry is.
    out = area.parent / "copy"
    co = checkout(repo, res.entry, out)
    assert not (out / "vm.vmx.lck").exists()
    assert any("crash-consistent" in n for n in co.notes)


def test_clean_save_is_not_crash_consistent(repo: Repository, area: Path) -> None:
    res = commit(repo, area)
    assert not res.crash_consistent
    vm = show(repo, res.entry).entry.vm
    assert vm is not None
    assert (vm.info.hypervisor, vm.info.name, vm.info.memory_mib) == ("vmware", "test", 64)
    assert vm.info.power_state == "off" and vm.crash_consistent is False
    assert vm.external_files == ()


def test_qemu_io_holding_the_image_refuses(repo: Repository, tmp_path: Path) -> None:
    need("qemu-img")
    need("qemu-io")
    area = tmp_path / "vm"
    area.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", area / "vm.qcow2", "1M")
    with qemu_io_open(area / "vm.qcow2"):
        for _ in range(200):  # until qemu-io has the image open and locked
            if running_reasons(area):
                break
            time.sleep(0.05)
        with pytest.raises(VMRunning, match=r"vm\.qcow2 is locked"):
            commit(repo, area)
        assert no_entries(repo)
        assert not (area / ".vml" / "area.json").exists()
        res = commit(repo, area, force_running=True)
        assert res.crash_consistent
    res2 = commit(repo, area, allow_empty=True)
    assert not res2.crash_consistent


def _golden_area(tmp_path: Path) -> tuple[Path, Path]:
    """An area whose qcow2 overlay is backed by a golden image outside it."""
    golden = tmp_path / "golden" / "base.qcow2"
    golden.parent.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", golden, "2M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512k", golden)
    area = tmp_path / "vm"
    area.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", golden, "-F", "qcow2", area / "vm.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 256k 64k", area / "vm.qcow2")
    return area, golden


def test_outside_backing_refused_without_flag(repo: Repository, tmp_path: Path) -> None:
    need("qemu-img")
    need("qemu-io")
    area, golden = _golden_area(tmp_path)
    with pytest.raises(AreaError, match=str(golden)):
        commit(repo, area)
    assert no_entries(repo)


def test_include_external_saves_and_rebuilds(repo: Repository, tmp_path: Path) -> None:
    need("qemu-img")
    need("qemu-io")
    area, golden = _golden_area(tmp_path)
    e1 = commit(repo, area, include_external=True)
    assert [(e.source, e.path) for e in e1.external] == [
        (str(golden.resolve()), ".external/1/base.qcow2")
    ]
    shown = show(repo, e1.entry)
    assert {f.path for f in shown.files} == {"vm.qcow2", ".external/1/base.qcow2"}
    assert shown.entry.vm is not None
    assert shown.entry.vm.to_json()["external_files"] == [
        {"source": str(golden.resolve()), "path": ".external/1/base.qcow2"}
    ]
    # The area it was saved from is clean: the copy is not expected there.
    assert status(repo, area).clean

    # Change both; the next entry keeps the name and stores only the change.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 64k", golden)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 1536k 64k", area / "vm.qcow2")
    e2 = commit(repo, area, include_external=True)
    assert [e.path for e in e2.external] == [".external/1/base.qcow2"]
    assert ".external/1/base.qcow2" in e2.changed_files
    assert e2.stored_bytes < 64 << 10

    # Rebuild elsewhere with the golden image gone: the copy serves, once pointed at.
    saved_golden = tmp_path / "golden-e2.qcow2"
    shutil.copy(golden, saved_golden)
    golden.unlink()
    out = tmp_path / "elsewhere"
    co = checkout(repo, e2.entry, out)
    copy = out / ".external" / "1" / "base.qcow2"
    run("qemu-img", "compare", "-q", saved_golden, copy)
    note = next(n for n in co.notes if ".external/1/base.qcow2" in n)
    assert "missing on this host" in note and "qemu-img rebase -u -b" in note
    run(
        "qemu-img",
        "rebase",
        "-u",
        "-b",
        ".external/1/base.qcow2",
        "-F",
        "qcow2",
        "vm.qcow2",
        cwd=out,
    )
    run("qemu-img", "check", "-q", out / "vm.qcow2")
    shutil.copy(saved_golden, golden)  # the original area's chain, to compare with
    run("qemu-img", "compare", "-q", area / "vm.qcow2", out / "vm.qcow2")


def test_external_that_cannot_be_read_is_refused(repo: Repository, tmp_path: Path) -> None:
    # A VMDK descriptor whose extents and parent live in folders that do not exist here.
    area = tmp_path / "vm"
    area.mkdir()
    shutil.copy(FIXTURES / "external.vmdk", area / "external.vmdk")
    with pytest.raises(AreaError, match="not a readable regular file"):
        commit(repo, area, include_external=True)
    assert no_entries(repo)
    assert not (area / ".vml" / "area.json").exists()


def test_restored_copy_gives_way_to_the_source(repo: Repository, tmp_path: Path) -> None:
    need("qemu-img")
    need("qemu-io")
    area, _golden = _golden_area(tmp_path)
    e1 = commit(repo, area, include_external=True)
    out = tmp_path / "copy"
    checkout(repo, e1.entry, out)  # the VM there still names the golden image
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 64k", out / "vm.qcow2")
    e2 = commit(repo, out, include_external=True)
    # Same name, not a second copy under .external/2/.
    assert [e.path for e in e2.external] == [".external/1/base.qcow2"]
    assert {f.path for f in show(repo, e2.entry).files} == {"vm.qcow2", ".external/1/base.qcow2"}
    # A copy the user changed is kept, and the source moves to a fresh number.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 64k", out / ".external/1/base.qcow2")
    e3 = commit(repo, out, include_external=True)
    assert [e.path for e in e3.external] == [".external/2/base.qcow2"]
    assert {f.path for f in show(repo, e3.entry).files} == {
        "vm.qcow2",
        ".external/1/base.qcow2",
        ".external/2/base.qcow2",
    }


def test_notes_after_checkout_into_another_folder(repo: Repository, tmp_path: Path) -> None:
    vmware = tmp_path / "vmware"
    vmware.mkdir()
    shutil.copy(FIXTURES / "suspended.vmx", vmware / "win.vmx")
    (vmware / "win.vmdk").write_bytes(b"")
    e1 = commit(repo, vmware)
    assert checkout(repo, e1.entry, vmware).notes == []  # same folder: nothing to say
    co = checkout(repo, e1.entry, tmp_path / "win-copy")
    assert len(co.notes) == 1 and "moved or copied" in co.notes[0]
    assert "uuid.action" in co.notes[0] and str(vmware.resolve()) in co.notes[0]

    vbox = tmp_path / "vbox"
    vbox.mkdir()
    (vbox / "m.vbox").write_text(
        '<?xml version="1.0"?><VirtualBox xmlns="http://www.virtualbox.org/" version="1.19">'
        '<Machine uuid="{0b5c4e8a-1111-4c2d-9a58-6a0f7d2e5b01}" name="m" OSType="Ubuntu_64">'
        '<Hardware><Memory RAMSize="512"/></Hardware></Machine></VirtualBox>'
    )
    e2 = commit(repo, vbox)
    co = checkout(repo, e2.entry, tmp_path / "vbox-copy")
    assert any("registervm" in n and "UUID" in n for n in co.notes), co.notes

    libvirt = tmp_path / "libvirt"
    libvirt.mkdir()
    (libvirt / "d.img").write_bytes(b"\0" * 4096)
    (libvirt / "vm.xml").write_text(
        f'<domain type="kvm"><name>d</name><memory unit="MiB">256</memory><devices>'
        f'<disk type="file" device="disk"><source file="{libvirt / "d.img"}"/></disk>'
        f"</devices></domain>"
    )
    e3 = commit(repo, libvirt)
    co = checkout(repo, e3.entry, tmp_path / "libvirt-copy")
    assert any("virsh" in n and "<source file" in n for n in co.notes), co.notes
    # The absolute path leads back into the original area: named precisely.
    assert any(str((libvirt / "d.img").resolve()) in n for n in co.notes), co.notes
