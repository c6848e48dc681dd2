"""Every disk format through ``vml commit`` / ``vml checkout``, checked by qemu-img itself.

For each format: make an image with qemu-img, write to it with qemu-io, save;
write more, save again; check both entries out into folders of other names
and let ``qemu-img check`` and ``qemu-img compare`` judge what was rebuilt.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import need
from vml.plumbing.repository import Repository
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit

pytestmark = pytest.mark.compat

# (qemu format, create options, image name, files that make up the disk)
FORMATS = [
    ("vmdk", "subformat=monolithicSparse", "d.vmdk", ["d.vmdk"]),
    ("vmdk", "subformat=monolithicFlat", "d.vmdk", ["d.vmdk", "d-flat.vmdk"]),
    ("vmdk", "subformat=twoGbMaxExtentSparse", "d.vmdk", ["d.vmdk", "d-s001.vmdk"]),
    ("vmdk", "subformat=streamOptimized", "d.vmdk", ["d.vmdk"]),
    ("qcow2", "", "d.qcow2", ["d.qcow2"]),
    ("raw", "", "d.img", ["d.img"]),
    ("vdi", "", "d.vdi", ["d.vdi"]),
]


def run(*args: str | Path, cwd: Path | None = None) -> str:
    return subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True, cwd=cwd
    ).stdout


def keep_sparse_copy(src: Path, dest: Path) -> None:
    """Copy an area without .vml, holes kept (``qemu-img compare -s`` compares allocation)."""
    dest.mkdir()
    for p in src.iterdir():
        if p.name != ".vml":
            run("cp", "-a", "--sparse=always", p, dest / p.name)


def qemu_io(fmt: str, image: Path, command: str) -> None:
    run("qemu-io", "-f", fmt, "-c", command, image)


def check(fmt: str, image: Path) -> None:
    if fmt != "raw":  # raw has nothing to check
        run("qemu-img", "check", "-q", "-f", fmt, image)


def compare(fmt: str, a: Path, b: Path) -> None:
    # -s: strict, sizes and allocation must match too; exit 0 means identical
    run("qemu-img", "compare", "-q", "-s", "-f", fmt, "-F", fmt, a, b)


@pytest.mark.parametrize(("fmt", "opts", "name", "files"), FORMATS, ids=lambda x: str(x))
def test_format_round_trip(
    repo: Repository, tmp_path: Path, fmt: str, opts: str, name: str, files: list[str]
) -> None:
    need("qemu-img")
    need("qemu-io")
    area = tmp_path / "vm"
    area.mkdir()
    create = ["qemu-img", "create", "-q", "-f", fmt]
    if opts:
        create += ["-o", opts]
    run(*create, area / name, "2M", cwd=area)
    assert sorted(p.name for p in area.iterdir()) == sorted(files)
    image = area / name
    qemu_io(fmt, image, "write -P 0x5a 0 192k")
    qemu_io(fmt, image, "write -P 0x33 1M 64k")
    e1 = commit(repo, area, message="first")
    first = tmp_path / "first-state"
    keep_sparse_copy(area, first)

    qemu_io(fmt, image, "write -P 0xc4 1536k 128k")  # streamOptimized: fresh clusters only
    e2 = commit(repo, area, message="second")
    assert e2.kind == "incremental" and e2.parent == e1.entry
    assert e2.changed_files

    for entry, want in ((e1.entry, first), (e2.entry, area)):
        out = tmp_path / f"elsewhere-{entry}"
        res = checkout(repo, entry, out)
        assert sorted(p.name for p in out.iterdir() if p.name != ".vml") == sorted(files)
        check(fmt, out / name)
        compare(fmt, want / name, out / name)
        assert not any("outside" in n for n in res.notes), res.notes
    # The two states really differ, so the comparisons above mean something.
    with pytest.raises(subprocess.CalledProcessError):
        compare(fmt, tmp_path / f"elsewhere-{e1.entry}" / name, area / name)


def test_qcow2_backing_inside_area(repo: Repository, tmp_path: Path) -> None:
    need("qemu-img")
    need("qemu-io")
    area = tmp_path / "vm"
    (area / "base").mkdir(parents=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", area / "base" / "gold.qcow2", "2M")
    qemu_io("qcow2", area / "base" / "gold.qcow2", "write -P 0x11 0 512k")
    run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base/gold.qcow2", "-F", "qcow2",
        area / "top.qcow2",
    )  # fmt: skip
    qemu_io("qcow2", area / "top.qcow2", "write -P 0x22 256k 64k")
    e1 = commit(repo, area)
    first = tmp_path / "first-state"
    keep_sparse_copy(area, first)
    qemu_io("qcow2", area / "top.qcow2", "write -P 0x44 1M 64k")
    e2 = commit(repo, area)
    assert e2.changed_files == ["top.qcow2"]  # the base is untouched
    for entry, want in ((e1.entry, first), (e2.entry, area)):
        out = tmp_path / f"other-{entry}"
        res = checkout(repo, entry, out)
        # The relative backing name resolves inside the new folder, not the old one.
        info = run("qemu-img", "info", "--backing-chain", out / "top.qcow2")
        assert str(out / "base" / "gold.qcow2") in info and str(area) not in info
        check("qcow2", out / "top.qcow2")
        compare("qcow2", want / "top.qcow2", out / "top.qcow2")
        assert res.notes == []  # qemu without libvirt XML: nothing to adjust
