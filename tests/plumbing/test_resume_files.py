"""Running states saved through QMP or libvirt: the resume file, paths, command lines, XML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vml.errors import AreaError, IncompatibleState
from vml.plumbing.vm.libvirt import Domain, DomainDisk, _plan, parse_domain, remap_xml
from vml.plumbing.vm.rerun import _machine_arg, resume_command
from vml.plumbing.vm.resume import (
    ResumeInfo,
    discard,
    find_resume,
    read_resume,
    remap,
    stem_for,
)


def test_remap_moves_paths_into_the_new_area_and_nothing_else() -> None:
    old, new = "/vms/lab", "/tmp/copy"
    assert remap("/vms/lab/root.img", old, new) == "/tmp/copy/root.img"
    assert (
        remap("file=/vms/lab/root.img,format=raw", old, new) == "file=/tmp/copy/root.img,format=raw"
    )
    assert remap("file:/vms/lab/console.log", old, new) == "file:/tmp/copy/console.log"
    assert remap("/vms/lab", old, new) == "/tmp/copy"
    # Another folder that merely starts the same, or the path inside a word, stays.
    assert remap("/vms/lab2/root.img", old, new) == "/vms/lab2/root.img"
    assert remap("x/vms/lab/root.img", old, new) == "x/vms/lab/root.img"
    # A new area inside the old one is not remapped twice.
    assert remap("/vms/lab/a", old, "/vms/lab/copy") == "/vms/lab/copy/a"
    # QEMU doubles commas in option values.
    assert remap("file=/v,ms/root.img,format=raw", "/v,ms", "/n") == "file=/n/root.img,format=raw"
    assert remap("file=/v,,ms/root.img,format=raw", "/v,ms", "/n,x") == (
        "file=/n,,x/root.img,format=raw"
    )


def test_machine_type_is_pinned_to_the_one_saved() -> None:
    assert _machine_arg("q35", "pc-q35-7.2") == "pc-q35-7.2"
    assert _machine_arg("q35,accel=tcg", "pc-q35-7.2") == "pc-q35-7.2,accel=tcg"
    assert _machine_arg("accel=tcg", "pc-q35-7.2") == "pc-q35-7.2,accel=tcg"
    assert _machine_arg("type=pc,usb=off", "pc-i440fx-7.2") == "type=pc-i440fx-7.2,usb=off"


COMMAND = (
    "qemu-system-x86_64 -M q35 -daemonize -pidfile /run/q.pid --qmp unix:/run/q.sock,server "
    "-drive file=/vms/lab/root.img,if=virtio -S -monitor stdio -incoming tcp:0:4444 "
    "-serial file:/vms/lab/c.log"
)


def _info(**kw: object) -> ResumeInfo:
    base: dict[str, object] = {
        "via": "qmp",
        "state": "lab.migstream",
        "area": "/vms/lab",
        "saved": "2026-01-01T00:00:00Z",
        "qemu": "7.2.0",
        "machine": "pc-q35-7.2",
        "accel": "tcg",
        "command": tuple(COMMAND.split()),
    }
    base.update(kw)
    return ResumeInfo(**base)  # type: ignore[arg-type]


def test_resume_command_is_the_saved_one_in_the_new_area_with_vmls_sockets(tmp_path: Path) -> None:
    cmd = resume_command(tmp_path, _info())
    area = str(tmp_path.absolute())
    assert cmd[:3] == ["qemu-system-x86_64", "-M", "pc-q35-7.2"]
    assert f"file={area}/root.img,if=virtio" in cmd and f"file:{area}/c.log" in cmd
    for gone in ("-daemonize", "/run/q.pid", "--qmp", "unix:/run/q.sock,server", "stdio",
                 "tcp:0:4444", "-monitor"):  # fmt: skip
        assert gone not in cmd
    assert cmd.count("-S") == 1 and cmd[-2:] == ["-incoming", "defer"]
    assert f"{area}/.vml/run/qemu.pid" in cmd
    # No -machine at all: the saved type is added (the default would be another).
    bare = resume_command(tmp_path, _info(command=("qemu-system-x86_64", "-m", "64")))
    assert bare[3:5] == ["-machine", "pc-q35-7.2"]


def test_a_state_without_a_command_line_says_how_to_resume_it_by_hand(tmp_path: Path) -> None:
    info = _info(command=(), resume="`vml run AREA` resumes it; by hand: -incoming ...")
    with pytest.raises(IncompatibleState) as e:
        resume_command(tmp_path, info)
    assert "command line" in e.value.message and "-incoming" in (e.value.remedy or "")


def test_resume_files_round_trip_and_malformed_ones_are_refused(tmp_path: Path) -> None:
    info = _info()
    info.write(tmp_path / "lab.resume.json")
    assert find_resume(tmp_path) == "lab.resume.json"
    assert read_resume(tmp_path, "lab.resume.json") == info
    doc = json.loads((tmp_path / "lab.resume.json").read_text())
    for key, bad in (("vml_resume", 2), ("via", "vmware"), ("state", "../x.migstream"),
                     ("state", "lab.vmstate"), ("command", "qemu -m 1"), ("area", 3)):  # fmt: skip
        (tmp_path / "bad.json").write_text(json.dumps({**doc, key: bad}))
        with pytest.raises(IncompatibleState, match="not a saved running state"):
            read_resume(tmp_path, "bad.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(IncompatibleState):
        read_resume(tmp_path, "bad.json")
    (tmp_path / "other.resume.json").write_text("{}")
    with pytest.raises(AreaError, match="several"):
        find_resume(tmp_path)
    (tmp_path / "other.resume.json").unlink()
    (tmp_path / "lab.migstream").write_bytes(b"QEVM")
    discard(tmp_path, "lab.resume.json")
    assert not (tmp_path / "lab.migstream").exists() and find_resume(tmp_path) is None


def test_stems_from_vm_names() -> None:
    assert stem_for("my vm/1", "vm") == "my_vm_1"
    assert stem_for("..", "vm") == "vm" and stem_for("", "x") == "x"


DOMAIN = """<domain type='kvm' id='3'>
  <name>lab</name><uuid>5f0c1b34-0000-4000-8000-000000000001</uuid>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><kernel>/vms/lab/vmlinuz</kernel></os>
  <devices>
    <disk type='file' device='disk'><source file='/vms/lab/root.qcow2'/><target dev='vda'/></disk>
    <disk type='file' device='cdrom'><source file='/isos/debian.iso'/><target dev='sda'/><readonly/></disk>
    <disk type='file' device='disk'><source file='/data/scratch.img'/><target dev='vdb'/></disk>
    <serial type='file'><source path='/vms/lab/console.log'/></serial>
  </devices>
</domain>"""


def test_a_domain_is_read_and_its_disks_planned(tmp_path: Path) -> None:
    dom = parse_domain(DOMAIN, "qemu:///system")
    assert (dom.name, dom.kind, dom.machine) == ("lab", "kvm", "pc-q35-7.2")
    assert [(d.target, d.device, d.readonly) for d in dom.disks] == [
        ("vda", "disk", False), ("sda", "cdrom", True), ("vdb", "disk", False),
    ]  # fmt: skip
    area = tmp_path / "lab"
    area.mkdir()
    here = Domain(None, "lab", "u", "qemu", "pc-q35-7.2", (
        DomainDisk("vda", "disk", str(area / "root.qcow2"), False),
        DomainDisk("sda", "cdrom", "/isos/debian.iso", True),
    ))  # fmt: skip
    ours, left = _plan(area, here)
    assert [d.target for d in ours] == ["vda"] and [d.target for d in left] == ["sda"]
    # A disk it writes outside the area cannot be saved consistently with it.
    outside = Domain(None, "lab", "u", "qemu", "m", (*here.disks, dom.disks[2]))
    with pytest.raises(AreaError, match="vdb"):
        _plan(area, outside)


def test_the_saved_domain_xml_points_into_the_new_area() -> None:
    text = remap_xml(DOMAIN, "/vms/lab", "/home/me/copy")
    assert "/home/me/copy/root.qcow2" in text and "/home/me/copy/console.log" in text
    assert "<kernel>/home/me/copy/vmlinuz</kernel>" in text
    assert "/isos/debian.iso" in text and "/data/scratch.img" in text
    assert "/vms/lab" not in text
    with pytest.raises(Exception, match="DTD"):
        remap_xml("<!DOCTYPE x [<!ENTITY a 'b'>]><domain/>", "/a", "/b")
