"""Attributes come back as saved: permission bits of files, folders and the area, and times."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK
from tests.reliability.helpers import one_line_error
from tests.reliability.helpers import vml_in_process as vml
from vml.errors import NothingToCommit
from vml.plumbing.repository import Repository, init_repository
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit
from vml.porcelain.status import status

FILES = {"private.key": 0o600, "shared.txt": 0o640, "run.sh": 0o700, "ro.cfg": 0o444, "tool": 0o755}
FOLDERS = {"secret": 0o700, "group": 0o750, "frozen": 0o555, "frozen/inner": 0o711}
OLD = -2_000_000_000 * 10**9 + 123  # 1906, before the epoch
LATE = 13_000_000_000 * 10**9 + 456_789  # 2381


def _attrs(root: Path) -> dict[str, tuple[int, int]]:
    """Path -> (permission bits, mtime) of every file and folder; '.' is the area itself."""
    out = {".": (os.stat(root).st_mode & 0o777, 0)}
    for d, dirs, files in os.walk(root):
        if Path(d) == root:
            dirs[:] = [x for x in dirs if x != ".vml"]
        for name in dirs + files:
            p = Path(d, name)
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_mode & 0o777, st.st_mtime_ns)
    return out


def _make(area: Path) -> None:
    area.mkdir()
    for folder in FOLDERS:
        (area / folder).mkdir(parents=True, exist_ok=True)
    for folder in FOLDERS:
        (area / folder / "f").write_bytes(b"in " + folder.encode())
    for name, perm in FILES.items():
        (area / name).write_bytes(os.urandom(100 if name != "tool" else 2 * TEST_BLOCK + 1))
        os.chmod(area / name, perm)
    os.utime(area / "shared.txt", ns=(OLD, OLD))
    os.utime(area / "tool", ns=(LATE, LATE))
    for folder, perm in sorted(FOLDERS.items(), reverse=True):
        os.chmod(area / folder, perm)
    os.chmod(area, 0o700)


def test_permissions_and_times_round_trip(repo: Repository, tmp_path: Path) -> None:
    area = tmp_path / "area"
    _make(area)
    want = _attrs(area)
    commit(repo, area)
    out = tmp_path / "out"
    checkout(repo, "E1", out)
    assert _attrs(out) == want
    assert status(repo, out).clean


def test_a_permission_change_is_a_change(repo: Repository, tmp_path: Path) -> None:
    area = tmp_path / "area"
    _make(area)
    e1 = _attrs(area)
    commit(repo, area)
    with pytest.raises(NothingToCommit):
        commit(repo, area)
    os.chmod(area / "shared.txt", 0o604)  # a private file made world-readable
    assert [c.path for c in status(repo, area).changes] == ["shared.txt"]
    commit(repo, area)
    os.chmod(area / "group", 0o755)  # only a folder's permissions
    assert [c.path for c in status(repo, area).changes] == ["group/"]
    e3 = commit(repo, area)
    assert e3.changed_files == ["group/"]
    os.chmod(area, 0o755)
    assert [c.path for c in status(repo, area).changes] == ["./"]
    restore(repo, "E1", area, force=True)
    got = _attrs(area)
    assert got == e1
    restore(repo, e3.entry, area)
    assert os.stat(area / "group").st_mode & 0o777 == 0o755
    assert os.stat(area / "shared.txt").st_mode & 0o777 == 0o604


@pytest.mark.parametrize("mtime", [10**30, -(10**30), (1 << 63) * 10**9, "soon", 1.5, True])
def test_an_impossible_time_is_refused_before_anything_changes(
    tmp_path: Path, mtime: object
) -> None:
    from tests.reliability.test_hostile_repository import forge

    repo = tmp_path / "repo"
    init_repository(repo, TEST_BLOCK).close()
    area = tmp_path / "area"
    area.mkdir()
    (area / "vm.vmx").write_text("x")
    assert vml(repo, "commit", "-q", area).code == 0

    def edit(git: object, root: object, meta: dict[str, object]) -> None:
        files = meta["files"]
        assert isinstance(files, list)
        files[0]["mtime_ns"] = mtime

    forge(repo, edit)
    run = vml(repo, "checkout", "E2", tmp_path / "t")
    assert run.code == 7 and "modification time" in one_line_error(run)
    assert not (tmp_path / "t").exists()
    run = vml(repo, "verify", "E2")
    assert run.code != 0


def test_entries_without_recorded_permissions_restore_git_s_two_modes(
    repo: Repository, tmp_path: Path
) -> None:
    """Entries saved before permissions were kept: 644 or 755, as they always did."""
    from tests.reliability.test_hostile_repository import forge

    area = tmp_path / "area"
    _make(area)
    commit(repo, area)

    def edit(git: object, root: object, meta: dict[str, object]) -> None:
        meta.pop("folders")
        meta.pop("root_perm")
        files = meta["files"]
        assert isinstance(files, list)
        for f in files:
            f.pop("perm")

    forge(repo.path, edit)
    out = tmp_path / "out"
    checkout(repo, "E2", out)
    assert os.stat(out / "private.key").st_mode & 0o777 == 0o644
    assert os.stat(out / "run.sh").st_mode & 0o777 == 0o755
    assert status(repo, out).clean
