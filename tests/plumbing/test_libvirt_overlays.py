"""What a libvirt live save merges back, deletes and refuses, decided from the domain itself.

The real ``virsh`` and libvirtd run in the guest tests (tests/guest); here
``virsh`` is replaced by a recorder answering ``dumpxml`` with a domain in
a given state, to try the decisions that matter when something went wrong:
a blockcommit only ever merges VML's own overlay, and only into the image
right under it (``--shallow``); an overlay the domain does not run on is
deleted, never merged; a writable network disk is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vml.errors import AreaError
from vml.plumbing.vm import libvirt
from vml.plumbing.vm.libvirt import _merge_all, _plan, parse_domain


def _xml(*disks: tuple[str, str]) -> str:
    items = "".join(
        f"<disk type='file' device='disk'><source file='{src}'/><target dev='{t}'/></disk>"
        for t, src in disks
    )
    return (
        "<domain type='qemu'><name>lab</name><os><type machine='pc'>hvm</type></os>"
        f"<devices>{items}</devices></domain>"
    )


class Virsh:
    """Records virsh's arguments; ``dumpxml`` answers ``xml``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.xml = ""

    def __call__(self, uri: str | None, *args: str, timeout: float = 120.0) -> str:
        self.calls.append(args)
        return self.xml if args[0] == "dumpxml" else ""


@pytest.fixture
def virsh(monkeypatch: pytest.MonkeyPatch) -> Virsh:
    fake = Virsh()
    monkeypatch.setattr(libvirt, "virsh", fake)
    return fake


def test_only_disks_on_vml_overlays_are_merged_and_shallowly(tmp_path: Path, virsh: Virsh) -> None:
    area = tmp_path / "lab"
    (area / ".vml" / "overlays").mkdir(parents=True)
    ov_a = area / ".vml" / "overlays" / "vda-1.qcow2"
    ov_b = area / ".vml" / "overlays" / "vdb-1.qcow2"
    ov_a.write_bytes(b"a")
    ov_b.write_bytes(b"b")
    # vda runs on VML's overlay; vdb does not (libvirt never switched it, or it
    # was merged already): its top is the user's own image, with a backing file.
    virsh.xml = _xml(("vda", str(ov_a)), ("vdb", str(area / "data.qcow2")))
    dom = parse_domain(virsh.xml)
    _merge_all(area, dom, [("vda", ov_a), ("vdb", ov_b)])
    commits = [c for c in virsh.calls if c[0] == "blockcommit"]
    assert commits == [("blockcommit", "lab", "vda", "--active", "--shallow", "--pivot", "--wait")]
    assert not ov_a.exists() and not ov_b.exists()


def test_a_writable_network_disk_is_refused(tmp_path: Path) -> None:
    area = tmp_path / "lab"
    area.mkdir()
    xml = (
        "<domain type='qemu'><name>lab</name><devices>"
        f"<disk type='file' device='disk'><source file='{area}/root.qcow2'/><target dev='vda'/></disk>"
        "<disk type='network' device='disk'><source protocol='rbd' name='pool/img'/>"
        "<target dev='vdb'/></disk></devices></domain>"
    )
    with pytest.raises(AreaError, match=r"vdb \(a network disk\)"):
        _plan(area, parse_domain(xml))
