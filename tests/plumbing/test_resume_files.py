"""Running states saved through QMP or libvirt: the resume file, paths, command lines, XML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vml.errors import AreaError, HostileRepository, IncompatibleState
from vml.plumbing.vm.libvirt import Domain, DomainDisk, _plan, parse_domain, remap_xml
from vml.plumbing.vm.rerun import (
    _machine_arg,
    check_qemu,
    check_restore_xml,
    resume_command,
    resume_cwd,
)
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


# --- a resume touches no file outside the area it resumes in (#11) ----------------------


def _areas(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A home folder holding the area saved from (``vms/lab``), and the new area."""
    home = tmp_path / "home"
    old = home / "vms" / "lab"
    old.mkdir(parents=True)
    new = tmp_path / "copy"
    new.mkdir()
    return home, old, new


def _run(new: Path, old: Path, *args: str, cwd: str = "") -> list[str]:
    info = _info(area=str(old), cwd=cwd, command=("qemu-system-x86_64", *args))
    return resume_command(new, info)


def test_paths_reaching_the_old_area_relative_or_through_a_link_move_into_the_new(
    tmp_path: Path,
) -> None:
    home, old, new = _areas(tmp_path)
    # QEMU started in the home folder, with paths relative to it.
    cmd = _run(new, old, "-drive", "file=vms/lab/disk.qcow2,if=virtio", "-kernel",
               "vms/lab/vmlinuz", "vms/lab/hda.img", cwd=str(home))  # fmt: skip
    assert f"file={new}/disk.qcow2,if=virtio" in cmd
    assert cmd[cmd.index("-kernel") + 1] == f"{new}/vmlinuz" and f"{new}/hda.img" in cmd
    assert resume_cwd(new, _info(area=str(old), cwd=str(home))) == new
    # The old area reached through a symbolic link (the resume file holds its real path).
    (tmp_path / "link").symlink_to(home)
    cmd = _run(new, old, "-drive", f"file={tmp_path}/link/vms/lab/d,,1.img,format=raw",
               "-object", f"memory-backend-file,id=m,mem-path={tmp_path}/link/vms/lab/ram",
               "-serial", f"file:{tmp_path}/link/vms/lab/console.log")  # fmt: skip
    assert f"file={new}/d,,1.img,format=raw" in cmd
    assert f"memory-backend-file,id=m,mem-path={new}/ram" in cmd
    assert f"file:{new}/console.log" in cmd
    # Started inside the area: its folder moves along, and relative paths stay inside.
    (old / "sub").mkdir()
    (new / "sub").mkdir()
    cmd = _run(new, old, "-drive", "file=../disk.img", cwd=str(old / "sub"))
    assert f"file={new}/disk.img" in cmd
    assert resume_cwd(new, _info(area=str(old), cwd=str(old / "sub"))) == new / "sub"
    # Devices hold no data (a random source, a remote disk): they stay.
    cmd = _run(new, old, "-object", "rng-random,id=r,filename=/dev/urandom", "-cdrom", "nbd:h:1")
    assert "rng-random,id=r,filename=/dev/urandom" in cmd and "nbd:h:1" in cmd


@pytest.mark.parametrize(
    "args",
    [
        ("-drive", "file=vms/lab/../../other.qcow2,if=virtio"),  # relative to QEMU's old folder
        ("-drive", "if=none,id=d,file=/etc/hostname"),
        ("-drive", 'file=json:{"driver":"file",,"filename":"/srv/x.img"}'),
        ("-drive", "file=file:/srv/x.img"),
        ("-blockdev", '{"driver":"qcow2","file":{"driver":"file","filename":"/srv/x.qcow2"}}'),
        ("-blockdev", "driver=file,node-name=f,filename=/srv/x.img"),
        ("-object", "memory-backend-file,id=m,mem-path=/dev/shm/ram,share=on"),
        ("-mem-path", "/dev/shm"),
        ("-pflash", "/usr/share/OVMF/OVMF_VARS.fd"),  # the guest's UEFI variables: written
        ("-drive", "if=pflash,format=raw,file=/srv/vars.fd"),
        (
            "-blockdev",
            '{"driver":"file","node-name":"f","filename":"/srv/x.img","read-only":false}',
        ),
        ("-set", "drive.d0.file=/srv/x.img"),
        ("-chardev", "socket,id=c,path=/tmp/some.sock,server=on"),
        ("-serial", "unix:/tmp/s.sock,server=on"),
        ("-D", "/tmp/qemu.log"),
        ("-fsdev", "local,id=f,path=/home,security_model=none"),
        ("/srv/hda.img",),  # a word after no option: a disk image
        ("-unknown-option", "/srv/x"),  # perhaps a file
    ],
)
def test_a_command_naming_a_file_outside_the_new_area_is_refused(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    home, old, new = _areas(tmp_path)
    with pytest.raises(AreaError) as e:
        _run(new, old, "-m", "64", *args, cwd=str(home))
    assert "outside the area" in e.value.message and "by hand" in e.value.remedy
    assert "\n" not in str(e.value)


def test_files_qemu_only_reads_may_stay_outside_the_new_area(tmp_path: Path) -> None:
    """Firmware code, a kernel, an ISO: the resumed guest reads the same file, losing nothing."""
    home, old, new = _areas(tmp_path)
    ro = (
        "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
        "-cdrom", "/isos/debian.iso",
        "-drive", "file=/isos/tools.iso,media=cdrom,if=ide",
        "-kernel", "/boot/vmlinuz", "-initrd", "../initrd.img",
        "-blockdev", '{"driver":"file","node-name":"ro","filename":"/srv/ro.img","read-only":true}',
        "-drive", f"file={old}/disk.qcow2,if=virtio",
        "-drive", f"file={old}/seed.iso,readonly=on",
    )  # fmt: skip
    cmd = _run(new, old, *ro, cwd=str(home))
    for kept in ("/usr/share/OVMF/OVMF_CODE.fd", "/isos/debian.iso", "/isos/tools.iso",
                 "/boot/vmlinuz", "/srv/ro.img"):  # fmt: skip
        assert any(kept in a for a in cmd), kept
    # Read-only or not, what was in the old area is the new area's file.
    assert f"file={new}/seed.iso,readonly=on" in cmd and f"file={new}/disk.qcow2,if=virtio" in cmd
    assert not any(str(old) in a for a in cmd)


@pytest.mark.parametrize(
    "command",
    [
        ("/bin/sh", "-c", "rm -rf ~"),
        ("rm", "-rf", "/"),
        ("/vms/lab/qemu-system-x86_64.sh",),
        ("",),
        ("python3", "-m", "qemu-system-x86_64"),
    ],
)
def test_a_saved_program_that_is_not_qemu_is_never_run(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    info = _info(command=command)
    with pytest.raises(HostileRepository):
        resume_command(tmp_path, info)
    # Nor asked its version.
    with pytest.raises(HostileRepository):
        check_qemu(info, command[0], tmp_path, "lab.resume.json")


def test_a_qemu_of_the_area_or_one_that_runs_other_programs_is_refused(tmp_path: Path) -> None:
    area = tmp_path / "area"
    area.mkdir()
    fake = area / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho pwned > $0.ran\n")
    fake.chmod(0o755)
    with pytest.raises(HostileRepository, match="a file of the area"):
        check_qemu(_info(), str(fake), area, "lab.resume.json")
    assert not Path(f"{fake}.ran").exists()
    for args in (("-plugin", "file=/area/x.so"), ("-readconfig", "q.cfg"),
                 ("-netdev", "tap,id=n,script=/area/up.sh"),
                 ("-nic", "tap,helper=/area/helper")):  # fmt: skip
        with pytest.raises(IncompatibleState, match="VML does not"):
            resume_command(area, _info(command=("qemu-system-x86_64", *args)))
    ok = resume_command(
        area, _info(command=("qemu-system-x86_64", "-netdev", "tap,id=n,script=no"))
    )
    assert "tap,id=n,script=no" in ok


def _fake_qemu(where: Path, body: str) -> Path:
    where.mkdir(exist_ok=True)
    qemu = where / "qemu-system-x86_64"
    qemu.write_text(f"#!/bin/sh\n{body}\n")
    qemu.chmod(0o755)
    return qemu


def test_a_qemu_that_hangs_or_is_too_old_says_what_works_for_this_entry(tmp_path: Path) -> None:
    area = tmp_path / "area"
    area.mkdir()
    hangs = _fake_qemu(tmp_path / "hangs", "sleep 5")
    with pytest.raises(IncompatibleState) as e:
        check_qemu(_info(), str(hangs), area, "lab.resume.json", timeout=0.2)
    assert "did not answer" in e.value.message
    for err in (e,):
        assert "lab.resume.json" in err.value.remedy and "lab.migstream" in err.value.remedy
    old = _fake_qemu(tmp_path / "old", "echo 'QEMU emulator version 6.0.0'")
    with pytest.raises(IncompatibleState) as e2:
        check_qemu(_info(), str(old), area, "lab.resume.json")
    # Not `vml run --discard-state`: an area saved through QMP has no description to boot.
    assert "--discard-state" not in e2.value.remedy
    assert "lab.resume.json" in e2.value.remedy and "lab.migstream" in e2.value.remedy
    new = _fake_qemu(tmp_path / "new", "echo 'QEMU emulator version 7.2.0'")
    assert check_qemu(_info(), str(new), area, "lab.resume.json") == str(new)


def test_a_restored_domain_writes_no_file_outside_the_new_area(tmp_path: Path) -> None:
    new = tmp_path / "copy"
    new.mkdir()
    ours = DOMAIN.replace("<disk type='file' device='disk'><source file='/data/scratch.img'/>"
                          "<target dev='vdb'/></disk>", "")  # fmt: skip
    check_restore_xml(new, remap_xml(ours, "/vms/lab", str(new)))  # the ISO is read-only
    with pytest.raises(AreaError, match="vdb"):
        check_restore_xml(new, remap_xml(DOMAIN, "/vms/lab", str(new)))
    # A path to the old area the remapping misses (through a link) would write the old disk.
    via_link = ours.replace("/vms/lab/root.qcow2", "/home/me/lab/root.qcow2")
    with pytest.raises(AreaError, match=r"root\.qcow2"):
        check_restore_xml(new, remap_xml(via_link, "/vms/lab", str(new)))
    log = ours.replace("/vms/lab/console.log", "/home/me/.bashrc")
    with pytest.raises(AreaError, match="bashrc"):
        check_restore_xml(new, remap_xml(log, "/vms/lab", str(new)))
