"""A command that fails removes what it made and nothing else, or leaves a state a rerun finishes.

`vml clone` was the only one shown (test_sharing_identity.py).  Here:
`vml init` (and through it `clone` and `demo`) failing inside the making
of the repository (the disk full at its config), `vml demo` failing after
its first steps, and `vml vm init` failing after it copied a kernel into
the area (the initrd missing, of the same name, or the disk full mid-copy).
Failures are injected where no real one can be made on demand; the tests
run as root, for whom a read-only folder is not read-only.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from dulwich.config import ConfigFile

from tests.reliability.helpers import snapshot
from vml.errors import VMLError
from vml.plumbing.repository import init_repository, is_repository
from vml.porcelain import demo as demo_mod
from vml.porcelain import vminit as vminit_mod
from vml.porcelain.init import init


def _disk_full(*_a: object, **_k: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_init_into_a_new_folder_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ConfigFile, "write_to_path", _disk_full)
    with pytest.raises(OSError):
        init(tmp_path / "new" / "deep" / "repo")
    assert list(tmp_path.iterdir()) == []  # not even the parents it made
    monkeypatch.undo()
    init(tmp_path / "new" / "deep" / "repo")  # and the same command then works


def test_a_failed_init_into_an_empty_folder_leaves_it_empty_and_what_others_put_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "repo"
    target.mkdir()

    def another_program_writes_then_the_disk_fills(*_a: object, **_k: object) -> None:
        (target / "notes.txt").write_text("not the repository's\n")
        _disk_full()

    monkeypatch.setattr(ConfigFile, "write_to_path", another_program_writes_then_the_disk_fills)
    with pytest.raises(OSError):
        init_repository(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert not is_repository(target)


def test_a_failed_demo_removes_what_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def checkout_fails(*_a: object, **_k: object) -> None:
        raise VMLError("the checkout broke")

    monkeypatch.setattr(demo_mod, "checkout", checkout_fails)
    with pytest.raises(VMLError):
        demo_mod.demo(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(VMLError):
        demo_mod.demo(given)
    assert given.is_dir() and list(given.iterdir()) == []


def _area(root: Path) -> tuple[Path, Path]:
    area = root / "area"
    area.mkdir()
    (area / "disk.img").write_bytes(bytes(1 << 16))
    boot = root / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"kernel" * 1000)
    (boot / "initrd.img").write_bytes(b"initrd" * 1000)
    return area, boot


@pytest.mark.parametrize("how", ["missing initrd", "same name", "disk full mid-copy"])
def test_a_failed_vm_init_leaves_the_area_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    area, boot = _area(tmp_path)
    kernel, initrd = boot / "vmlinuz", boot / "initrd.img"
    if how == "missing initrd":
        initrd = boot / "gone.img"
    elif how == "same name":
        other = tmp_path / "other"
        other.mkdir()
        initrd = other / "vmlinuz"
        initrd.write_bytes(b"another file of the same name")
    else:
        real = shutil.copyfile
        calls: list[int] = []

        def copy_then_fail(src: Path, dst: Path) -> Path:
            calls.append(1)
            if len(calls) == 2:  # the initrd: half of it written, then the disk is full
                Path(dst).write_bytes(Path(src).read_bytes()[:100])
                _disk_full()
            return Path(real(src, dst))

        monkeypatch.setattr(vminit_mod.shutil, "copyfile", copy_then_fail)
    before = snapshot(area)
    with pytest.raises((VMLError, OSError)):
        vminit_mod.vm_init(area, disks=[area / "disk.img"], kernel=kernel, initrd=initrd)
    assert snapshot(area) == before
    monkeypatch.undo()
    if how == "missing initrd":
        initrd = boot / "initrd.img"
    if how != "same name":  # the same command, its input fixed, then works
        done = vminit_mod.vm_init(area, disks=[area / "disk.img"], kernel=kernel, initrd=initrd)
        assert sorted(done.copied) == ["initrd.img", "vmlinuz"]


@pytest.mark.parametrize("fails", [True, False], ids=["then-fails", "succeeds"])
def test_vm_init_does_not_copy_through_a_dangling_symlink_nor_remove_it(
    tmp_path: Path, fails: bool
) -> None:
    """A link of the kernel's name in the area, its target not there yet, is the user's.

    ``exists()`` follows links, so a dangling one read as free: the copy went
    through it (making its target, which could be outside the area), and a
    failure after then unlinked the link, which vm init never made.
    """
    area, boot = _area(tmp_path)
    outside = tmp_path / "elsewhere" / "vmlinuz-6.1"
    outside.parent.mkdir()
    (area / "vmlinuz").symlink_to(outside)
    initrd = boot / ("gone.img" if fails else "initrd.img")
    before = snapshot(area)
    with pytest.raises(VMLError, match="vmlinuz exists there"):
        vminit_mod.vm_init(area, disks=[area / "disk.img"], kernel=boot / "vmlinuz", initrd=initrd)
    assert snapshot(area) == before
    assert (area / "vmlinuz").is_symlink()
    assert not outside.exists(), "the copy was written through the link"
