"""Recognising VMs: real images from qemu-img, hand-written configs, real lock holders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import qemu_io_open
from vml.errors import AreaError, CorruptRepository, VMRunning
from vml.plumbing.vm.formats import parse_vmdk_descriptor, read_disk
from vml.plumbing.vm.info import DiskInfo, VMInfo
from vml.plumbing.vm.inspect import check_saveable, inspect_area, running_reasons

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vm"
MiB = 1024 * 1024

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
needs_qemu_io = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")


def qemu_img(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, cwd=cwd)


def qemu_info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: dict[str, object] = json.loads(out)
    return info


def fixture(area: Path, name: str, as_name: str | None = None) -> Path:
    dest = area / (as_name or name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / name, dest)
    return dest


def disk(info: VMInfo, path: str) -> DiskInfo:
    found = [d for d in info.disks if d.path == path]
    assert found, f"{path} not in {[d.path for d in info.disks]}"
    return found[0]


# --- disk images made by qemu-img ---------------------------------------------


@needs_qemu_img
@pytest.mark.compat
@pytest.mark.parametrize(
    ("subformat", "files"),
    [
        ("monolithicSparse", ["d.vmdk"]),
        ("monolithicFlat", ["d.vmdk", "d-flat.vmdk"]),
        ("twoGbMaxExtentSparse", ["d.vmdk", "d-s001.vmdk"]),
        ("streamOptimized", ["d.vmdk"]),
    ],
)
def test_vmdk_subformats(tmp_path: Path, subformat: str, files: list[str]) -> None:
    qemu_img(
        "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", tmp_path / "d.vmdk", "3M"
    )
    info = inspect_area(tmp_path)
    assert info.hypervisor == "vmware"
    assert info.config is None
    assert len(info.disks) == 1, info.disks  # extents are not disks of their own
    d = info.disks[0]
    assert d.path == "d.vmdk"
    assert d.format == f"vmdk-{subformat}"
    assert d.virtual_size == 3 * MiB == qemu_info(tmp_path / "d.vmdk")["virtual-size"]
    assert list(d.files) == files
    assert d.external == ()
    assert d.backing is None


@needs_qemu_img
@pytest.mark.compat
def test_vmdk_delta_names_parent(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", "2M")
    qemu_img(
        "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", tmp_path / "base-000001.vmdk"
    )
    info = inspect_area(tmp_path)
    delta = disk(info, "base-000001.vmdk")
    assert delta.backing == "base.vmdk"
    assert delta.virtual_size == 2 * MiB
    assert disk(info, "base.vmdk").backing is None


@needs_qemu_img
@pytest.mark.compat
def test_qcow2_with_backing_chain(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "images" / "base.qcow2", "4M")
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "images/base.qcow2",
        "-F",
        "qcow2",
        tmp_path / "top.qcow2",
    )
    info = inspect_area(tmp_path)
    assert info.hypervisor == "qemu"
    top = disk(info, "top.qcow2")
    assert (top.format, top.virtual_size, top.backing) == ("qcow2", 4 * MiB, "images/base.qcow2")
    assert top.files == ("top.qcow2",)
    base = disk(info, "images/base.qcow2")
    assert (base.format, base.virtual_size, base.backing) == ("qcow2", 4 * MiB, None)
    assert check_saveable(tmp_path, force_running=False, include_external=False) == info


@needs_qemu_img
@pytest.mark.compat
def test_qcow2_backing_outside_area_is_external(tmp_path: Path) -> None:
    area = tmp_path / "area"
    area.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "golden.qcow2", "1M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "../golden.qcow2", "-F", "qcow2", area / "vm.qcow2"
    )
    info = inspect_area(area)
    vm = disk(info, "vm.qcow2")
    golden = str((tmp_path / "golden.qcow2").resolve())
    assert vm.backing == golden
    assert vm.external == (golden,)
    assert [d.path for d in info.disks] == ["vm.qcow2"]  # the outside parent is not described
    with pytest.raises(AreaError, match=r"golden\.qcow2") as exc:
        check_saveable(area, force_running=False, include_external=False)
    assert exc.value.remedy
    assert check_saveable(area, force_running=False, include_external=True).external == (golden,)


@needs_qemu_img
@pytest.mark.compat
@pytest.mark.parametrize(
    ("fmt", "name", "expect"),
    [
        ("raw", "r.img", "raw"),
        ("raw", "r.raw", "raw"),
        ("vdi", "d.vdi", "vdi"),
        ("vpc", "d.vhd", "vpc"),
    ],
)
def test_other_formats(tmp_path: Path, fmt: str, name: str, expect: str) -> None:
    qemu_img("create", "-q", "-f", fmt, tmp_path / name, "5M")
    d = inspect_area(tmp_path).disks[0]
    assert (d.path, d.format) == (name, expect)
    assert d.virtual_size == qemu_info(tmp_path / name)["virtual-size"]


@needs_qemu_img
@pytest.mark.compat
def test_qcow2_external_data_file(tmp_path: Path) -> None:
    # qemu-img creates a relative data file in its working directory, and
    # records the name as given; qemu then opens it next to the image.
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "data_file=vm.data", "vm.qcow2", "1M", cwd=tmp_path
    )
    assert (tmp_path / "vm.data").exists()
    info = inspect_area(tmp_path)
    assert [d.path for d in info.disks] == ["vm.qcow2"]
    assert info.disks[0].files == ("vm.qcow2", "vm.data")


@needs_qemu_img
@pytest.mark.compat
def test_content_wins_over_suffix(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "disk.img", "1M")
    assert inspect_area(tmp_path).disks[0].format == "qcow2"


@needs_qemu_img
@pytest.mark.compat
def test_huge_images_are_described_from_headers(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "big.qcow2", "4T")
    with open(tmp_path / "sparse.raw", "wb") as f:
        f.truncate(1 << 40)  # sparse: costs nothing on disk, would take ages to read
    # Reading 1 TiB of holes would not finish: describing it at all shows
    # that only headers are read (no timing asserted: benchmarks live in bench/).
    info = inspect_area(tmp_path)
    assert disk(info, "big.qcow2").virtual_size == 4 << 40
    assert disk(info, "sparse.raw").virtual_size == 1 << 40


# --- configurations -------------------------------------------------------------


@needs_qemu_img
@pytest.mark.compat
def test_vmware_vmx_with_snapshot_chain(tmp_path: Path) -> None:
    vmx = fixture(tmp_path, "ubuntu.vmx")
    fixture(tmp_path, "disk-000001.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "disk.vmdk", "2M")
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "disk-000001-s001.vmdk", "2M")
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "data.vmdk", "1M")
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "unattached.vmdk", "1M")
    (tmp_path / "ubuntu.nvram").write_bytes(b"\0" * 16)
    (tmp_path / "vmware.log").write_text("log\n")
    info = inspect_area(tmp_path)
    assert info.hypervisor == "vmware"
    assert info.config == vmx.name
    assert info.name == 'Ubuntu "Dev" Box'  # |22 is VMware's escape for a quote
    assert (info.guest_os, info.memory_mib, info.power_state) == ("ubuntu-64", 2048, "off")
    paths = [d.path for d in info.disks]
    # Attached disks (with their parents) first, in config order, then the rest.
    assert paths == ["data.vmdk", "disk-000001.vmdk", "disk.vmdk", "unattached.vmdk"]
    snap = disk(info, "disk-000001.vmdk")
    assert snap.format == "vmdk-twoGbMaxExtentSparse"
    assert snap.files == ("disk-000001.vmdk", "disk-000001-s001.vmdk")
    assert snap.backing == "disk.vmdk"
    assert snap.virtual_size == 4192256 * 512
    assert info.external == ()  # the ISO is a CD-ROM, not a disk


def test_vmware_suspended(tmp_path: Path) -> None:
    fixture(tmp_path, "suspended.vmx")
    (tmp_path / "win-abc123.vmss").write_bytes(b"state")
    info = inspect_area(tmp_path)
    assert (info.name, info.guest_os, info.memory_mib) == ("Win", "windows9-64", 4096)
    assert info.power_state == "suspended"
    missing = disk(info, "win.vmdk")  # named by the config, file absent
    assert (missing.format, missing.virtual_size) == ("unknown", None)


def test_vmdk_descriptors_by_hand(tmp_path: Path) -> None:
    fixture(tmp_path, "vmfs.vmdk")
    (tmp_path / "vmfs-flat.vmdk").write_bytes(b"\0" * 512)
    ext = fixture(tmp_path, "external.vmdk", "area/external.vmdk")
    area = ext.parent
    info = inspect_area(tmp_path)
    vmfs = disk(info, "vmfs.vmdk")
    assert vmfs.format == "vmdk-vmfs"
    assert vmfs.virtual_size == (8388608 + 2048) * 512  # ZERO extents count, have no file
    assert vmfs.files == ("vmfs.vmdk", "vmfs-flat.vmdk")

    inner = inspect_area(area)
    d = disk(inner, "external.vmdk")
    assert d.format == "vmdk-twoGbMaxExtentFlat"
    assert d.files == ("external.vmdk", "external-f001.vmdk")
    shared = str((tmp_path / "shared" / "external-f002.vmdk").resolve())
    assert d.external == (shared, "/srv/golden/base.vmdk")
    assert d.backing == "/srv/golden/base.vmdk"
    with pytest.raises(AreaError, match="external-f002"):
        check_saveable(area, force_running=False, include_external=False)


@needs_qemu_img
@pytest.mark.compat
def test_virtualbox(tmp_path: Path) -> None:
    fixture(tmp_path, "linux.vbox")
    snap = "Snapshots/{aaaaaaaa-0000-4000-8000-000000000002}.vdi"
    (tmp_path / "Snapshots").mkdir()
    qemu_img("create", "-q", "-f", "vdi", tmp_path / "linux.vdi", "2M")
    qemu_img("create", "-q", "-f", "vdi", tmp_path / snap, "2M")
    (tmp_path / "Logs").mkdir()
    (tmp_path / "Logs" / "VBox.log").write_text("log\n")
    info = inspect_area(tmp_path)
    assert (info.hypervisor, info.config, info.name) == ("virtualbox", "linux.vbox", "linux")
    assert (info.guest_os, info.memory_mib, info.power_state) == ("Ubuntu_64", 3072, "off")
    assert [d.path for d in info.disks] == ["linux.vdi", snap, "/data/vbox/shared.vmdk"]
    assert disk(info, snap).backing == "linux.vdi"  # nesting in the .vbox, not the VDI header
    assert disk(info, snap).virtual_size == 2 * MiB
    shared = disk(info, "/data/vbox/shared.vmdk")
    assert (shared.format, shared.files, shared.external) == (
        "vmdk",
        (),
        ("/data/vbox/shared.vmdk",),
    )
    with pytest.raises(AreaError, match=r"shared\.vmdk"):
        check_saveable(tmp_path, force_running=False, include_external=False)


def test_virtualbox_saved_state(tmp_path: Path) -> None:
    fixture(tmp_path, "saved.vbox")
    info = inspect_area(tmp_path)
    assert (info.name, info.guest_os, info.memory_mib) == ("saved", "Windows10_64", 4096)
    assert info.power_state == "suspended"


@needs_qemu_img
@pytest.mark.compat
def test_libvirt_domain(tmp_path: Path) -> None:
    text = (FIXTURES / "domain.xml").read_text().replace("AREA", str(tmp_path))
    (tmp_path / "debian12.xml").write_text(text)
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "debian12.qcow2", "1M")
    info = inspect_area(tmp_path)
    assert (info.hypervisor, info.config, info.name) == ("qemu", "debian12.xml", "debian12")
    assert (info.guest_os, info.memory_mib) == ("http://debian.org/debian/12", 2048)
    assert [d.path for d in info.disks] == ["debian12.qcow2", "/var/lib/libvirt/images/scratch.img"]
    assert info.config_external == ("/var/lib/libvirt/qemu/nvram/debian12_VARS.fd",)
    assert info.external == (
        "/var/lib/libvirt/images/scratch.img",
        "/var/lib/libvirt/qemu/nvram/debian12_VARS.fd",
    )


def test_libvirt_plain(tmp_path: Path) -> None:
    fixture(tmp_path, "plain-os.xml")
    info = inspect_area(tmp_path)
    assert (info.name, info.guest_os, info.memory_mib, info.disks) == ("tiny", "hvm", 1024, ())


def test_empty_and_missing_areas(tmp_path: Path) -> None:
    none = VMInfo("none", None, None, None, "off", None, ())
    assert inspect_area(tmp_path) == none
    assert inspect_area(tmp_path / "nope") == none
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "other.xml").write_text("<project/>")
    assert inspect_area(tmp_path) == none
    with pytest.raises(AreaError):
        check_saveable(tmp_path / "nope", force_running=False, include_external=False)


def test_odd_files_never_raise(tmp_path: Path) -> None:
    (tmp_path / "garbage.vmdk").write_bytes(b"\x00\xff" * 100)
    (tmp_path / "trunc.qcow2").write_bytes(b"QFI\xfb\x00")
    (tmp_path / "KDMV.vmdk").write_bytes(b"KDMV" + b"\xff" * 60)
    (tmp_path / "weird.vmx").write_bytes(b"\xff\xfe\x00garbage = \n")
    (tmp_path / "broken.vbox").write_text("<VirtualBox><Machine")
    (tmp_path / "bomb.xml").write_text('<!DOCTYPE d [<!ENTITY a "aaaa">]><domain>&a;</domain>')
    (tmp_path / "dir.vmdk").mkdir()
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "dangling.qcow2").symlink_to(tmp_path / "missing")
    info = inspect_area(tmp_path)
    assert info.hypervisor in ("vmware", "qemu", "none")
    assert "garbage.vmdk" not in [d.path for d in info.disks]
    assert disk(info, "empty.img").virtual_size == 0


def test_ignored_files_are_not_disks(tmp_path: Path) -> None:
    (tmp_path / ".vml").mkdir()
    (tmp_path / ".vml" / "cache.img").write_bytes(b"\0" * 512)
    (tmp_path / "scratch.img").write_bytes(b"\0" * 512)
    (tmp_path / "keep.img").write_bytes(b"\0" * 1024)
    (tmp_path / ".vmlignore").write_text("scratch.img\n")
    assert [d.path for d in inspect_area(tmp_path).disks] == ["keep.img"]


def test_json_round_trip(tmp_path: Path) -> None:
    info = VMInfo(
        "qemu",
        "vm",
        "hvm",
        512,
        "suspended",
        "vm.xml",
        (DiskInfo("a.qcow2", "qcow2", 1024, ("a.qcow2",), ("/b.qcow2",), "/b.qcow2"),),
        ("/nvram.fd",),
    )
    text = json.dumps(info.to_json())
    assert VMInfo.from_json(json.loads(text)) == info
    bad: object
    for bad in ([], {"hypervisor": 1}, {**info.to_json(), "disks": [{"path": "x"}]}):
        with pytest.raises(CorruptRepository):
            VMInfo.from_json(bad)


# --- running VMs ------------------------------------------------------------------


def test_vmware_lock_folders(tmp_path: Path) -> None:
    fixture(tmp_path, "suspended.vmx", "vm.vmx")
    (tmp_path / "win.vmdk.lck").mkdir()
    (tmp_path / "win.vmdk.lck" / "M34096.lck").write_text("")
    (tmp_path / "vm.vmx.lck").write_text("")  # old VMware versions use a file
    reasons = running_reasons(tmp_path)
    assert any("win.vmdk.lck" in r for r in reasons)
    assert any("vm.vmx.lck" in r for r in reasons)
    assert not any("M34096" in r for r in reasons)  # the folder is named, not its content
    with pytest.raises(VMRunning, match=r"win\.vmdk\.lck") as exc:
        check_saveable(tmp_path, force_running=False, include_external=False)
    assert exc.value.remedy
    info = check_saveable(tmp_path, force_running=True, include_external=False)
    assert info.power_state == "running"
    assert inspect_area(tmp_path).power_state == "running"
    # Asked for the files' description only (a checkout's notes), nothing is
    # looked for: the same description, the power state the files say.
    files_only = inspect_area(tmp_path, running=False)
    assert files_only.power_state == "suspended"
    assert replace(files_only, power_state="running") == inspect_area(tmp_path)


@needs_qemu_img
@needs_qemu_io
@pytest.mark.compat
def test_qemu_io_holds_image_locks(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "vm.qcow2"
    )
    assert running_reasons(tmp_path) == []
    with qemu_io_open(tmp_path / "vm.qcow2"):
        reasons: list[str] = []

        def seen(rs: list[str]) -> bool:
            return (
                any(r.startswith("vm.qcow2 is locked") for r in rs)
                and any(r.startswith("base.qcow2 is locked") for r in rs)
                and any("qemu-io" in r and "vm.qcow2" in r for r in rs)
            )

        for _ in range(200):  # wait until qemu-io has opened and locked both images
            reasons = running_reasons(tmp_path)
            if seen(reasons):
                break
            time.sleep(0.05)
        assert any(r.startswith("vm.qcow2 is locked") for r in reasons), reasons
        assert any(r.startswith("base.qcow2 is locked") for r in reasons), reasons
        assert any("qemu-io" in r and "vm.qcow2" in r for r in reasons), reasons
        with pytest.raises(VMRunning, match=r"vm\.qcow2"):
            check_saveable(tmp_path, force_running=False, include_external=False)
        assert inspect_area(tmp_path).power_state == "running"
    assert running_reasons(tmp_path) == []


def test_open_for_writing_by_another_process(tmp_path: Path) -> None:
    # How a running VirtualBox VM shows: no lock file, no byte-range lock,
    # just a process that has the image open read-write.
    image = tmp_path / "vm.vdi"
    image.write_bytes(b"\0" * 512)
    (tmp_path / "reader.img").write_bytes(b"\0" * 512)
    holder = (
        "import sys, time; w = open(sys.argv[1], 'r+b'); r = open(sys.argv[2], 'rb');"
        " print('ready', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(image), str(tmp_path / "reader.img")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        reasons = running_reasons(tmp_path)
        assert len(reasons) == 1, reasons
        assert reasons[0].startswith("vm.vdi is open for writing by ")
        assert f"(pid {proc.pid})" in reasons[0]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    assert running_reasons(tmp_path) == []


def test_own_open_files_do_not_count(tmp_path: Path) -> None:
    image = tmp_path / "vm.img"
    image.write_bytes(b"\0" * 512)
    with open(image, "r+b"):
        assert running_reasons(tmp_path) == []


# --- parsers never raise on arbitrary input ------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_descriptor_parser_total(text: str) -> None:
    desc = parse_vmdk_descriptor(text)
    if desc is not None:
        assert desc.virtual_size is None or desc.virtual_size >= 0


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([b"", b"KDMV", b"QFI\xfb", b"COWD", b"# Disk DescriptorFile\n"]),
    st.binary(max_size=600),
    st.sampled_from(["x.vmdk", "x.qcow2", "x.img", "x.vdi", "x.vhd"]),
)
def test_read_disk_total(
    tmp_path_factory: pytest.TempPathFactory, magic: bytes, body: bytes, name: str
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(magic + body)
    read_disk(path)
