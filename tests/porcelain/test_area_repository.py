"""Which repository an area saves to, and a repository an area must never contain."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, digest_area, make_area
from vml.errors import AreaError, UsageError
from vml.plumbing.areas import load_state
from vml.plumbing.repository import Repository, init_repository
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit
from vml.porcelain.status import status


def test_an_area_moves_to_another_repository_only_when_asked(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    commit(repo, area)
    other = init_repository(tmp_path / "other", TEST_BLOCK)
    try:
        (area / "vm.vmx").write_text("edited\n")
        before = digest_area(area, mtimes=True)
        with pytest.raises(UsageError, match="--move") as exc:
            commit(other, area)
        assert str(repo.path) in str(exc.value)
        assert digest_area(area, mtimes=True) == before
        assert not list((other.path / "refs" / "vml").rglob("*"))  # nothing saved there
        res = commit(other, area, move=True)
        assert res.kind == "full" and res.entry == "E1"
        st = load_state(area)
        assert st is not None and st.repository == str(other.path.resolve())
        # Back in the first repository: the same rule the other way.
        with pytest.raises(UsageError, match="--move"):
            commit(repo, area, allow_empty=True)
    finally:
        other.close()


def test_the_same_repository_by_another_path_is_the_same(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    commit(repo, area)
    link = tmp_path / "link-to-repo"
    link.symlink_to(repo.path)
    from vml.plumbing.repository import open_repository

    again = open_repository(link)
    try:
        (area / "vm.vmx").write_text("edited\n")
        assert commit(again, area).entry == "E2"
    finally:
        again.close()


@contextmanager
def _bind(source: Path, target: Path) -> Iterator[None]:
    target.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if run.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {run.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_repository_bind_mounted_inside_the_area_is_refused(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    commit(repo, area)
    with _bind(repo.path, area / "backups" / "vml"):
        before = digest_area(repo.path)
        with pytest.raises(AreaError, match="the repository"):
            commit(repo, area)
        with pytest.raises(AreaError, match="the repository"):
            status(repo, area)
        with pytest.raises(AreaError, match="the repository"):
            checkout(repo, "E1", area, force=True)
        assert digest_area(repo.path) == before


def test_an_area_bind_mounted_inside_itself_is_refused(repo: Repository, tmp_path: Path) -> None:
    area = tmp_path / "area"
    make_area(area)
    with _bind(area, area / "loop"), pytest.raises(AreaError, match="itself"):
        commit(repo, area)


def test_an_area_reached_inside_the_repository_by_a_bind_mount_is_refused(
    repo: Repository, tmp_path: Path
) -> None:
    inside = repo.path / "vml" / "scratch"
    inside.mkdir()
    make_area(inside)
    with _bind(inside, tmp_path / "looks-outside"), pytest.raises(AreaError, match="inside"):
        commit(repo, tmp_path / "looks-outside")
