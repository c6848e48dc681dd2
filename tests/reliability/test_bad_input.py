"""Running VMs and bad input: one clear line, a non-zero exit, nothing changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import digest_area, make_area, qemu_io_open
from tests.reliability.helpers import git_fsck, one_line_error, repo_state, snapshot, vml
from tests.reliability.helpers import vml_in_process as vml_fast
from vml.errors import FileChanged
from vml.plumbing.repository import open_repository
from vml.porcelain.commit import commit


@pytest.fixture
def saved(tmp_path: Path, cli_repo: Path) -> tuple[Path, Path]:
    """A repository with E1 saved from ``area``."""
    area = tmp_path / "area"
    make_area(area)
    assert vml_fast(cli_repo, "commit", "-q", area).code == 0
    return cli_repo, area


def test_vmware_lock_refuses_commit(saved: tuple[Path, Path]) -> None:
    repo, area = saved
    (area / "disk.img").write_bytes(b"changed")
    (area / "vm.vmx.lck").mkdir()
    before = repo_state(repo), snapshot(area)
    run = vml_fast(repo, "commit", area)
    assert run.code == 6 and "running" in one_line_error(run)
    assert (repo_state(repo), snapshot(area)) == before


def test_qemu_image_held_open_refuses_commit(tmp_path: Path, cli_repo: Path) -> None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("needs qemu-img and qemu-io")
    area = tmp_path / "q"
    area.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(area / "vm.qcow2"), "1M"],
        check=True,
        capture_output=True,
    )
    with qemu_io_open(area / "vm.qcow2"):
        before = repo_state(cli_repo)
        for _ in range(100):
            run = vml_fast(cli_repo, "commit", area)
            if run.code == 6:
                break
        assert run.code == 6 and "locked" in one_line_error(run)
        assert repo_state(cli_repo) == before
        assert not (area / ".vml").exists()
    assert vml_fast(cli_repo, "commit", "-q", area).code == 0


def test_a_file_changed_while_read_is_not_saved(saved: tuple[Path, Path]) -> None:
    """A writer appends to the disk while commit reads it: FileChanged, no entry."""
    repo_path, area = saved
    repo = open_repository(repo_path)
    before = repo_state(repo_path)
    disk = area / "disk.img"
    with disk.open("r+b") as f:  # changed, so commit must read it
        f.write(os.urandom(4096))
    calls = 0

    def progress(phase: str, done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # inside disk.img: a background writer appends
            t = threading.Thread(target=lambda: disk.open("ab").write(os.urandom(5000)))
            t.start()
            t.join()

    try:
        with pytest.raises(FileChanged, match=r"disk\.img changed"):
            commit(repo, area, force_running=True, progress=progress)
    finally:
        repo.close()
    assert repo_state(repo_path)[0] == before[0]


def test_a_file_changed_between_scan_and_read_is_not_saved(tmp_path: Path, cli_repo: Path) -> None:
    """The change lands after the folder was listed but before the image is opened."""
    area = tmp_path / "area"
    make_area(area)
    (area / "a-first.txt").write_text("small, read first")
    assert vml_fast(cli_repo, "commit", "-q", area).code == 0
    (area / "a-first.txt").write_text("small, read first, changed")
    disk = area / "disk.img"
    with disk.open("r+b") as f:  # changed, so commit must read it
        f.write(os.urandom(4096))
    repo = open_repository(cli_repo)
    before = repo_state(cli_repo)

    def progress(phase: str, done: int, total: int) -> None:
        if done == len("small, read first, changed"):  # after a-first.txt, before disk.img
            with disk.open("r+b") as f:
                f.write(b"new data at the start of the disk")

    try:
        with pytest.raises(FileChanged, match=r"disk\.img changed"):
            commit(repo, area, force_running=True, progress=progress)
    finally:
        repo.close()
    assert repo_state(cli_repo)[0] == before[0]


def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs."""
    yield from _tmpfs(tmp_path / "small", "2m")


def test_no_space_in_the_repository(tmp_path: Path, small_fs: Path) -> None:
    repo = small_fs / "repo"
    assert vml_fast(repo, "init", "--block-size", "64K", repo).code == 0
    area = tmp_path / "big"
    area.mkdir()
    (area / "disk.img").write_bytes(os.urandom(3 << 20))
    before = repo_state(repo)
    run = vml(repo, "commit", area)
    assert run.code == 9 and "space" in one_line_error(run)
    assert repo_state(repo) == before  # no entry, no ref, no half pack left
    assert not (area / ".vml" / "area.json").exists()
    git_fsck(repo)


def test_no_space_in_the_area(tmp_path: Path, small_fs: Path, cli_repo: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "disk.img").write_bytes(os.urandom(3 << 20))
    (src / "vm.vmx").write_text("x")
    assert vml_fast(cli_repo, "commit", "-q", src).code == 0
    target = small_fs / "area"
    run = vml(cli_repo, "checkout", "E1", target)
    assert run.code == 9 and "space" in one_line_error(run)
    # Marked as interrupted, no half file under the real name, no temp file left.
    assert vml_fast(cli_repo, "status", target).out.count("interrupted") == 1
    assert not (target / "disk.img").exists()
    assert [p.name for p in target.iterdir()] == [".vml"] or sorted(
        p.name for p in target.iterdir()
    ) == [".vml", "vm.vmx"]


def test_permission_denied_read_only_repository(tmp_path: Path) -> None:
    """Root ignores file modes, so a read-only mount stands in for a repository we may not write."""
    gen = _tmpfs(tmp_path / "ro", "4m")
    fs = next(gen)
    try:
        repo = fs / "repo"
        assert vml_fast(repo, "init", "--block-size", "64K", repo).code == 0
        area = tmp_path / "area"
        make_area(area)
        assert vml_fast(repo, "commit", "-q", area).code == 0
        (area / "vm.vmx").write_text("changed")
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        before = repo_state(repo), snapshot(area)
        run = vml(repo, "commit", area)
        assert run.code != 0 and "read-only" in one_line_error(run).lower()
        assert (repo_state(repo), snapshot(area)) == before
        run = vml(repo, "checkout", "E1", fs / "area")
        assert run.code != 0 and "read-only" in one_line_error(run).lower()
    finally:
        gen.close()


def test_area_inside_repository_and_repository_inside_area(
    tmp_path: Path, saved: tuple[Path, Path]
) -> None:
    repo, area = saved
    before = repo_state(repo), snapshot(repo)
    run = vml_fast(repo, "checkout", "E1", repo / "inside")
    assert run.code == 5 and "inside the repository" in one_line_error(run)
    assert (repo_state(repo), snapshot(repo)) == before
    outer = tmp_path / "outer"
    shutil.copytree(area, outer)
    shutil.rmtree(outer / ".vml")
    nested = outer / "repo"
    assert vml_fast(nested, "init", "--block-size", "64K", nested).code == 0
    snap = snapshot(outer)
    run = vml_fast(nested, "commit", outer)
    assert run.code == 5 and "inside the area" in one_line_error(run)
    assert snapshot(outer) == snap


def test_paths_with_spaces_and_unicode(tmp_path: Path, cli_repo: Path) -> None:
    area = tmp_path / "my VMs" / "Ubuntu 22.04 - test ü"
    make_area(area)
    (area / "Snapshots dir é").mkdir()
    (area / "Snapshots dir é" / "state 1 ☃.vmsn").write_bytes(os.urandom(70 << 10))
    assert vml_fast(cli_repo, "commit", "-q", "-m", "ünïcödé message", area).code == 0
    target = tmp_path / "out 2 ✓"
    assert vml_fast(cli_repo, "checkout", "-q", "E1", target).code == 0
    assert digest_area(target) == digest_area(area)
