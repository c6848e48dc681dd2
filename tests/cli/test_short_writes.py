"""A write the kernel cuts short (file-size limit, full disk) fails the checkout clearly."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from tests.conftest import TEST_BLOCK
from vml.plumbing.repository import Repository
from vml.porcelain.commit import commit

ROOT = Path(__file__).resolve().parents[2]


def _checkout_limited(
    repo: Repository, entry: str, dest: Path, limit: int
) -> subprocess.CompletedProcess[str]:
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "vml", "--repo", str(repo.path), "checkout", entry, str(dest), "-q"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        check=False,
    )


def test_a_small_file_cut_short_is_an_error_not_a_clean_area(
    repo: Repository, tmp_path: Path
) -> None:
    area = tmp_path / "area"
    area.mkdir()
    data = os.urandom(TEST_BLOCK - 100)  # a small file: stored whole
    (area / "vm.nvram").write_bytes(data)
    commit(repo, area)
    dest = tmp_path / "dest"
    run = _checkout_limited(repo, "E1", dest, TEST_BLOCK // 4)
    assert run.returncode == 9, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    # Nothing truncated is left under the file's name, and the area says so.
    assert not (dest / "vm.nvram").exists() or (dest / "vm.nvram").read_bytes() == data
    status = subprocess.run(
        [sys.executable, "-m", "vml", "--repo", str(repo.path), "status", str(dest)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert "interrupted checkout" in status.stdout + status.stderr


def test_an_image_cut_short_is_an_error(repo: Repository, tmp_path: Path) -> None:
    area = tmp_path / "area"
    area.mkdir()
    (area / "disk.img").write_bytes(os.urandom(4 * TEST_BLOCK))
    commit(repo, area)
    run = _checkout_limited(repo, "E1", tmp_path / "dest", TEST_BLOCK)
    assert run.returncode == 9, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
