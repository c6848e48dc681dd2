"""An entry whose layout cannot be written is called malformed, before anything is written.

A checkout used to meet a file and a folder of one name halfway through and
blame the user's folder ("is in the way").  The layout is now checked first
(vml/plumbing/layout.py): a path listed twice, a file and a folder of one
name, a file saved from outside the area recorded outside it.  ``verify``
and ``fsck`` name the same entries; names that only some file systems
merge (case, Unicode normalisation) are a note there, and a refusal on a
file system that merges them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dulwich.objects import Tree
from dulwich.repo import Repo

from tests.conftest import digest_area, make_area
from tests.reliability.helpers import one_line_error, snapshot
from tests.reliability.helpers import vml_in_process as vml
from tests.reliability.test_hostile_repository import Edit, forge
from vml.plumbing import layout


@pytest.fixture
def saved(tmp_path: Path, cli_repo: Path) -> tuple[Path, Path]:
    """E1 (a small VM, an area holding it); forged entries become E2."""
    area = tmp_path / "area"
    make_area(area, disk=256 << 10)
    assert vml(cli_repo, "commit", "-q", area).code == 0
    return cli_repo, area


def _files(meta: dict[str, object]) -> list[dict[str, object]]:
    files = meta["files"]
    assert isinstance(files, list)
    return files


def _record(meta: dict[str, object], path: str) -> dict[str, object]:
    return next(f for f in _files(meta) if f["path"] == path)


def _add_file(path: str) -> Edit:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        _files(meta).append({**_record(meta, "vm.vmx"), "path": path})

    return edit


def _add_dir(path: str) -> Edit:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        dirs = meta.setdefault("dirs", [])
        assert isinstance(dirs, list)
        dirs.append(path)

    return edit


def _external(path: str) -> Edit:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        vm = meta["vm"]
        assert isinstance(vm, dict)
        vm["external_files"] = [{"source": "/srv/golden/base.img", "path": path}]

    return edit


MALFORMED: list[tuple[Edit, str]] = [
    (_add_file("vm.vmx"), "lists 'vm.vmx' 2 times"),
    (_add_file("vm.vmx/inner"), "'vm.vmx' is both a file and a folder"),
    (_add_dir("vm.vmx"), "'vm.vmx' is both a file and a folder"),
    (_add_dir("disk.img/sub"), "'disk.img' is both a file and a folder"),
    (_external("../outside.img"), "recorded outside the area"),
    (_external(".external/1/base.img"), "not as one of its files"),
]
IDS = ["same-path-twice", "file-and-file-below", "file-and-folder", "file-and-folder-below",
       "external-leaves-the-area", "external-not-a-file"]  # fmt: skip


@pytest.mark.parametrize(("edit", "said"), MALFORMED, ids=IDS)
def test_a_malformed_entry_is_refused_before_anything_is_written(
    tmp_path: Path, saved: tuple[Path, Path], edit: Edit, said: str
) -> None:
    repo, area = saved
    forge(repo, edit)
    # Into a new folder: no file, no area state.
    target = tmp_path / "target"
    run = vml(repo, "checkout", "E2", target)
    line = one_line_error(run)
    assert run.code == 7 and "entry E2 is malformed" in line and said in line, line
    assert "in the way" not in line
    assert not target.exists()  # not even the folder is made
    # Over the area holding E1: nothing changes.
    before = snapshot(area)
    run = vml(repo, "checkout", "--force", "E2", area)
    assert run.code == 7 and "malformed" in one_line_error(run)
    assert snapshot(area) == before
    # verify and fsck say so; E1 is fine.
    for args in (["verify", "E2"], ["verify", "--all"], ["fsck"]):
        run = vml(repo, *args)
        assert run.code == 7 and "malformed" in run.out and said in run.out, (args, run)
        assert "entries affected: E2" in run.out, run.out
    assert vml(repo, "verify", "E1").code == 0


def _case_twin(git: Repo, root: Tree, meta: dict[str, object]) -> None:
    """A second name for disk.img that differs only in case (data and all)."""
    _files(meta).append({**_record(meta, "disk.img"), "path": "DISK.IMG"})
    images = git[root[b"images"][1]]
    assert isinstance(images, Tree)
    images[b"DISK.IMG"] = images[b"disk.img"]
    git.object_store.add_object(images)
    root[b"images"] = (0o040000, images.id)


def test_names_that_differ_only_in_case_are_a_note_and_fine_where_they_are_distinct(
    tmp_path: Path, saved: tuple[Path, Path]
) -> None:
    repo, area = saved
    forge(repo, _case_twin)
    for args in (["verify", "--all", "--read-data"], ["fsck"]):
        run = vml(repo, *args)
        assert run.code == 0 and "note E2" in run.out and "'DISK.IMG' and 'disk.img'" in run.out
    doc = json.loads(vml(repo, "fsck", "--json").out)
    assert doc["clean"] and doc["notes"]
    assert vml(repo, "checkout", "-q", "E2", tmp_path / "e2").code == 0  # this is ext4 (or alike)
    got = digest_area(tmp_path / "e2")
    assert got["DISK.IMG"] == got["disk.img"] == digest_area(area)["disk.img"]


def _normal_twin(git: Repo, root: Tree, meta: dict[str, object]) -> None:
    """Two names that differ only in Unicode normalisation (NFC and NFD)."""
    _files(meta).append({**_record(meta, "vm.vmx"), "path": "caf\u00e9"})
    _files(meta).append({**_record(meta, "vm.vmx"), "path": "cafe\u0301"})


@pytest.mark.parametrize(
    ("fold", "edit"),
    [("_case", _case_twin), ("_both", _case_twin), ("_normal", _normal_twin)],
    ids=["ignores-case", "ignores-case-and-normalisation", "normalises"],
)
def test_a_file_system_that_merges_names_refuses_the_entry(
    tmp_path: Path,
    saved: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    fold: str,
    edit: Edit,
) -> None:
    repo, _area = saved
    forge(repo, edit)
    monkeypatch.setattr(layout, "_folds", lambda where: getattr(layout, fold))
    target = tmp_path / "target"
    run = vml(repo, "checkout", "E2", target)
    line = one_line_error(run)
    assert run.code == 5 and "cannot hold entry E2" in line, line
    assert not target.exists()


def test_the_probe_finds_this_file_system_tells_names_apart(tmp_path: Path) -> None:
    assert layout._folds(tmp_path) is None  # the tests run on a Linux file system
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing
