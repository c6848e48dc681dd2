"""QEMU VMs VML runs: the description file, libvirt XML as a description, the command line,
saved-state headers, sparse copies.  Nothing here starts a VM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import allocated, need_unwritten_extents
from vml.errors import AreaError, IncompatibleState
from vml.plumbing.vm.description import (
    QemuDisk,
    QemuSpec,
    find_spec,
    from_libvirt,
    read_spec,
    spec_from_json,
    write_spec,
)
from vml.plumbing.vm.inspect import inspect_area
from vml.plumbing.vm.qemu import (
    MAGIC,
    QemuBuild,
    RunPaths,
    StateHeader,
    build_command,
    check_loadable,
    copy_sparse,
    read_state_header,
    version_tuple,
)

SPEC = QemuSpec(
    stem="lab",
    name="Lab VM",
    memory_mib=256,
    cpus=2,
    disks=(QemuDisk("disks/root.qcow2", "qcow2"), QemuDisk("data.img", "raw", "scsi")),
    kernel="boot/vmlinuz",
    initrd="boot/initrd.gz",
    append="console=ttyS0 root=/dev/vda",
    network="none",
    display="vnc=127.0.0.1:3",
    qemu_args=("-no-reboot",),
)
BUILD = QemuBuild(
    "/usr/bin/qemu-system-x86_64", "7.2.22", {"q35": "pc-q35-7.2", "pc-q35-7.2": "pc-q35-7.2"}
)


def test_description_round_trip(tmp_path: Path) -> None:
    path = write_spec(tmp_path, SPEC)
    assert path.name == "lab.qemu.json"
    back = read_spec(tmp_path, "lab.qemu.json")
    assert back == QemuSpec(**{**SPEC.__dict__, "source": "lab.qemu.json"})
    assert (back.ram_file, back.state_file) == ("lab.ram", "lab.vmstate")
    assert find_spec(tmp_path) == back
    doc = json.loads(path.read_text())
    assert doc["vml_qemu"] == 1 and doc["disks"][0] == {
        "path": "disks/root.qcow2",
        "format": "qcow2",
        "interface": "virtio",
    }


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"vml_qemu": 2}, "version 1"),
        ({"memory_mib": 0}, "memory_mib"),
        ({"memory_mib": "256"}, "memory_mib"),
        ({"disks": [{"path": "../outside.img"}]}, "inside the area"),
        ({"disks": [{"path": "/abs.img"}]}, "inside the area"),
        ({"disks": [{"path": ".vml/x.img"}]}, "inside the area"),
        ({"disks": [{"path": "a.img", "format": "vmdk"}]}, "format"),
        ({"kernel": "../vmlinuz"}, "inside the area"),
        ({"display": "vnc=:1,password=on"}, "display"),
        ({"network": "bridge"}, "network"),
        ({"qemu_args": "-no-reboot"}, "qemu_args"),
    ],
)
def test_a_bad_description_is_refused_naming_what(change: dict[str, object], what: str) -> None:
    doc = {**SPEC.to_json(), **change}
    with pytest.raises(AreaError, match=what):
        spec_from_json(doc, "lab", "lab.qemu.json")


def test_several_descriptions_are_refused(tmp_path: Path) -> None:
    write_spec(tmp_path, SPEC)
    write_spec(tmp_path, QemuSpec(**{**SPEC.__dict__, "stem": "other"}))
    with pytest.raises(AreaError, match="several VM descriptions"):
        find_spec(tmp_path)


def test_inspection_knows_the_description(tmp_path: Path) -> None:
    (tmp_path / "disks").mkdir()
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + b"\0" * 16 + (1 << 30).to_bytes(8, "big")
    (tmp_path / "disks" / "root.qcow2").write_bytes(header + b"\0" * 200)
    (tmp_path / "data.img").write_bytes(b"\0" * 4096)
    write_spec(tmp_path, SPEC)
    info = inspect_area(tmp_path)
    assert (info.hypervisor, info.name, info.memory_mib, info.config) == (
        "qemu",
        "Lab VM",
        256,
        "lab.qemu.json",
    )
    assert [(d.path, d.format) for d in info.disks] == [
        ("disks/root.qcow2", "qcow2"),
        ("data.img", "raw"),
    ]
    assert info.power_state == "off"
    # A saved running state next to the memory file: the VM is suspended.
    (tmp_path / "lab.vmstate").write_bytes(MAGIC)
    assert inspect_area(tmp_path).power_state == "suspended"


LIBVIRT = """<domain type='qemu'>
  <name>physics vm</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>{area}/vmlinuz</kernel><cmdline>console=ttyS0</cmdline></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{area}/vm.qcow2'/><target dev='vda' bus='virtio'/></disk>
    {extra}
  </devices>
</domain>"""


def test_a_libvirt_domain_is_read_as_a_description(tmp_path: Path) -> None:
    (tmp_path / "vm.xml").write_text(LIBVIRT.format(area=tmp_path, extra=""))
    spec = find_spec(tmp_path)
    assert spec is not None
    assert (spec.stem, spec.name, spec.memory_mib, spec.cpus, spec.machine) == (
        "physics_vm",
        "physics vm",
        512,
        2,
        "pc-q35-7.2",
    )
    assert spec.disks == (QemuDisk("vm.qcow2", "qcow2", "virtio"),)
    assert (spec.kernel, spec.append, spec.network) == ("vmlinuz", "console=ttyS0", "none")


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        ("<disk type='file' device='cdrom'><source file='/x.iso'/></disk>", "cdrom"),
        ("<disk type='block' device='disk'><source dev='/dev/sdb'/></disk>", "not a file"),
        ("<hostdev mode='subsystem' type='pci'/>", "hostdev"),
        (
            "<disk type='file' device='disk'><source file='/elsewhere/d.img'/></disk>",
            "outside the area",
        ),
    ],
)
def test_what_libvirt_says_that_vml_run_cannot_honour_is_refused(
    tmp_path: Path, extra: str, what: str
) -> None:
    (tmp_path / "vm.xml").write_text(LIBVIRT.format(area=tmp_path, extra=extra))
    with pytest.raises(AreaError, match=what):
        from_libvirt(tmp_path, "vm.xml")


def test_the_command_line_runs_memory_from_a_shared_file_and_waits_for_vml(tmp_path: Path) -> None:
    cmd = build_command(tmp_path, SPEC, BUILD, accel="tcg", machine="pc-q35-7.2")
    line = " ".join(cmd)
    assert cmd[0] == BUILD.binary
    assert "-machine pc-q35-7.2,memory-backend=vml-ram" in line
    assert f"memory-backend-file,id=vml-ram,size=256M,mem-path={tmp_path}/lab.ram,share=on" in line
    assert f"-qmp unix:{tmp_path}/.vml/run/qmp.sock,server=on,wait=off" in line
    assert f"path={tmp_path}/.vml/run/console.log" in line and "-accel tcg" in line
    assert f"file={tmp_path}/disks/root.qcow2,format=qcow2" in line
    assert "virtio-scsi-pci" in line and "scsi-hd,drive=vml-disk1" in line
    assert cmd[cmd.index("-append") + 1] == SPEC.append
    assert "-vnc 127.0.0.1:3" in line and "-nic none" in line
    assert "-S" in cmd and "-incoming" not in cmd and cmd[-1] == "-no-reboot"
    resume = build_command(tmp_path, SPEC, BUILD, accel="tcg", machine="pc-q35-7.2", incoming=True)
    assert resume[resume.index("-incoming") + 1] == "defer"
    console = build_command(tmp_path, SPEC, BUILD, accel="tcg", machine="pc-q35-7.2", console=True)
    assert any(a.startswith("stdio,id=vml-console,mux=on,signal=off,logfile=") for a in console)


def test_commas_in_paths_are_escaped_for_qemu(tmp_path: Path) -> None:
    area = tmp_path / "a,b"
    cmd = " ".join(build_command(area, SPEC, BUILD, accel="tcg", machine="pc-q35-7.2"))
    assert "mem-path=" + str(area).replace(",", ",,") + "/lab.ram" in cmd


def test_a_deep_area_gets_its_socket_at_a_short_path(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 100)
    target = RunPaths(deep).socket_target()
    assert len(str(target)) < 100 and target.name.endswith(".qmp")
    assert RunPaths(tmp_path).socket_target() == (tmp_path / ".vml/run/qmp.sock").absolute()
    keeper = RunPaths(deep).socket_target(RunPaths(deep).keeper_qmp)
    assert keeper == target.with_suffix(".keeper")


HEADER = StateHeader(
    "7.2.22", "pc-q35-7.2", "x86_64", "tcg", 256, "lab.ram", "2026-01-01T00:00:00Z"
)


def test_state_header_round_trip_and_refusals(tmp_path: Path) -> None:
    state = tmp_path / "lab.vmstate"
    state.write_bytes(HEADER.encode() + b"QEVM stream")
    header, offset = read_state_header(state)
    assert header == HEADER and state.read_bytes()[offset:] == b"QEVM stream"
    check_loadable(header, SPEC, BUILD, "tcg")  # the same QEMU loads it
    newer = QemuBuild(BUILD.binary, "8.0.0", {**BUILD.machines, "pc-q35-8.0": "pc-q35-8.0"})
    check_loadable(header, SPEC, newer, "tcg")
    for build, head, accel, what in [
        (QemuBuild(BUILD.binary, "7.1.0", BUILD.machines), header, "tcg", "cannot load it"),
        (QemuBuild(BUILD.binary, "9.0.0", {"q35": "pc-q35-9.0"}), header, "tcg", "machine type"),
        (BUILD, StateHeader(**{**HEADER.__dict__, "memory_mib": 512}), "tcg", "512 MiB"),
        (BUILD, header, "kvm", "under tcg"),
    ]:
        with pytest.raises(IncompatibleState, match=what):
            check_loadable(head, SPEC, build, accel)
    state.write_bytes(b"QEVM raw stream of someone else")
    with pytest.raises(IncompatibleState, match="not a saved state VML can resume"):
        read_state_header(state)
    assert version_tuple("7.2.22") > version_tuple("7.2.9")


def test_sparse_copies_keep_holes(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"a" * 8192)
        f.seek(40 << 20)
        f.write(os.urandom(65536))
    os.chmod(src, 0o600)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    dst = tmp_path / "copy"
    copied = copy_sparse(src, dst)
    # It stands for the original in an entry: the same mode and mtime.
    assert dst.stat().st_mode & 0o777 == 0o600
    assert dst.stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert dst.read_bytes() == src.read_bytes()
    assert copied < 1 << 20  # data, not the 64 MiB it could hold
    assert dst.stat().st_blocks * 512 < 2 << 20


def test_sparse_copies_of_disks_leave_unwritten_extents_out(tmp_path: Path) -> None:
    """Fallocated space whose zeros are cached is not copied; a page written in it is."""
    need_unwritten_extents(tmp_path)
    src = tmp_path / "disk"
    fd = os.open(src, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 8 << 20)
        os.posix_fallocate(fd, 1 << 20, 4 << 20)
        os.pwrite(fd, b"b" * 4096, 2 << 20)  # dirty, in the unwritten extent
        assert os.pread(fd, 1 << 20, 3 << 20) == bytes(1 << 20)  # cached zeros
    finally:
        os.close(fd)
    kept = copy_sparse(src, tmp_path / "copy")
    left = copy_sparse(src, tmp_path / "copy2", skip_unwritten=True)
    for dst in (tmp_path / "copy", tmp_path / "copy2"):
        assert dst.read_bytes() == src.read_bytes()
    assert kept >= (1 << 20) + 4096  # SEEK_DATA: the cached zeros too
    assert left == 4096 and allocated(tmp_path / "copy2") <= 8192
