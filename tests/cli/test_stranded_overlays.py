"""Overlays a live save left behind hold the guest's newest writes: never lost silently.

A save through QMP or libvirt runs the guest on qcow2 overlays in
``.vml/overlays`` and merges them back after it.  When the VM stops in
between (it powered off, QEMU was killed), they hold every write since the
pause, and the area's images lack them: a save at rest would store stale
images, a checkout would overwrite what they rest on.  Both refuse, naming
them; ``checkout --force`` discards them (and says so); while a QEMU still
runs on them they are not stranded (the next save merges them back).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cli.test_cli import vml
from tests.conftest import TEST_BLOCK, make_area, need, qemu_io_open
from vml.errors import VMControlError
from vml.plumbing.vm.inspect import stranded_overlays


def _area_with_overlay(tmp_path: Path) -> tuple[Path, Path, Path]:
    need("qemu-img")
    repo, area = tmp_path / "repo", tmp_path / "vm"
    area.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(area / "disk.qcow2"), "4M"], check=True
    )
    (area / "vm.vmx").write_text('displayName = "x"\n')
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    vml("-R", repo, "commit", area, "-m", "one")
    overlay = area / ".vml" / "overlays" / "disk.qcow2"
    overlay.parent.mkdir(parents=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(area / "disk.qcow2"),
         str(overlay)],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["qemu-io", "-c", "write -P 7 0 64k", str(overlay)], check=True, capture_output=True
    )
    return repo, area, overlay


def test_a_save_and_a_checkout_refuse_stranded_overlays(tmp_path: Path) -> None:
    repo, area, overlay = _area_with_overlay(tmp_path)
    assert stranded_overlays(area) == [".vml/overlays/disk.qcow2"]
    line = vml("-R", repo, "commit", area, "-m", "stale", code=5)
    assert ".vml/overlays/disk.qcow2" in line and "qemu-img commit" in line
    line = vml("-R", repo, "checkout", "E1", area, code=5)
    assert "without --force would lose them" in line
    assert overlay.exists() and "E2" not in vml("-R", repo, "log")
    # What the remedy says: merge it into its image, delete it, save.
    subprocess.run(["qemu-img", "commit", "-q", str(overlay)], check=True)
    overlay.unlink()
    assert "incremental entry E2" in vml("-R", repo, "commit", area, "-m", "merged")


def test_checkout_force_discards_stranded_overlays(tmp_path: Path) -> None:
    repo, area, overlay = _area_with_overlay(tmp_path)
    out = vml("-R", repo, "checkout", "--force", "E1", area)
    assert not overlay.exists() and "1 removed" in out
    assert "nothing changed" in vml("-R", repo, "status", area)


def test_overlays_a_qemu_still_runs_on_are_not_stranded(tmp_path: Path) -> None:
    _, area, overlay = _area_with_overlay(tmp_path)
    with qemu_io_open(overlay):
        assert stranded_overlays(area) == []


class _Snap:
    """What a save through QMP yields: no files of its own, a record."""

    files = None

    def record(self) -> dict[str, object]:
        return {"via": "qmp", "pause_seconds": 0.03}


def _merge_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """An area whose save goes through a stand-in for QMP whose merge back always fails.

    A real QEMU cannot be made to fail a block-commit on demand.
    """
    from vml.porcelain import commit as commit_mod

    @contextmanager
    def source() -> Iterator[_Snap]:
        try:
            yield _Snap()
        finally:
            raise VMControlError("the QEMU still runs on overlays", "the next save merges them")

    monkeypatch.setattr(commit_mod, "foreign_source", lambda *a, **k: source())
    repo, area = tmp_path / "repo", tmp_path / "vm"
    make_area(area)
    vml("init", repo, "--block-size", str(TEST_BLOCK))
    return repo, area


def test_a_merge_back_that_fails_after_the_save_is_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry is published: the failure to merge the overlays back is said, exit 0."""
    repo, area = _merge_fails(monkeypatch, tmp_path)
    out = vml("-R", repo, "commit", area, "-m", "live")
    assert "full entry E1" in out and "the QEMU still runs on overlays" in out
    assert "E1" in vml("-R", repo, "log")


def test_a_failed_save_says_its_own_error_before_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vml.errors import FileChanged
    from vml.porcelain import commit as commit_mod

    repo, area = _merge_fails(monkeypatch, tmp_path)

    def failing(*args: object, **kwargs: object) -> None:
        raise FileChanged("disk.img changed while it was read")

    monkeypatch.setattr(commit_mod, "_commit_locked", failing)
    line = vml("-R", repo, "commit", area, code=FileChanged.exit_code)
    assert line.startswith("vml: disk.img changed while it was read (then: the QEMU still runs")
