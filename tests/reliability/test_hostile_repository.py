"""Hostile repositories: entries forged with dulwich are refused, nothing leaves the area.

A repository is data from someone else.  Each test forges one entry from a
real one (by writing git objects directly), checks it out with the real CLI
and expects exit code 7 with one clear line, no file written outside the
target area, and no file in the area that claims to be the entry's.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from dulwich.objects import Blob, Commit, Tree
from dulwich.repo import Repo

from tests.conftest import make_area
from tests.reliability.helpers import one_line_error, snapshot
from tests.reliability.helpers import vml_in_process as vml
from vml.plumbing.deltas import MAGIC

Edit = Callable[[Repo, Tree, dict[str, object]], None]


def _put(git: Repo, obj: Blob | Tree | Commit) -> bytes:
    git.object_store.add_object(obj)
    return obj.id


def _replace(git: Repo, tree: Tree, path: list[bytes], mode: int, sha: bytes) -> bytes:
    """Put ``(mode, sha)`` at ``path`` below ``tree``; returns the new tree's id."""
    if len(path) == 1:
        tree[path[0]] = (mode, sha)
    else:
        sub = git[tree[path[0]][1]]
        assert isinstance(sub, Tree)
        tree[path[0]] = (0o040000, _replace(git, sub, path[1:], mode, sha))
    return _put(git, tree)


def _lookup(git: Repo, tree: Tree, path: list[bytes]) -> tuple[int, bytes]:
    mode, sha = tree[path[0]]
    if len(path) == 1:
        return mode, sha
    sub = git[sha]
    assert isinstance(sub, Tree)
    return _lookup(git, sub, path[1:])


def forge(repo: Path, edit: Edit) -> None:
    """Make entry E2 from E1 with ``edit`` applied to its root tree and metadata."""
    git = Repo(str(repo))
    try:
        c1 = git[git.refs[b"refs/vml/entries/1"]]
        assert isinstance(c1, Commit)
        root = git[c1.tree]
        assert isinstance(root, Tree)
        meta = json.loads(git[root[b"vml-entry.json"][1]].as_raw_string())
        edit(git, root, meta)
        blob = Blob.from_string(json.dumps(meta).encode())
        root[b"vml-entry.json"] = (0o100644, _put(git, blob))
        c = Commit()
        c.tree = _put(git, root)
        c.parents = []
        c.author = c.committer = b"Mallory <m@example.com>"
        c.author_time = c.commit_time = 1_700_000_000
        c.author_timezone = c.commit_timezone = 0
        c.message = b"forged\n"
        git.refs[b"refs/vml/entries/2"] = _put(git, c)
    finally:
        git.close()


@pytest.fixture
def world(tmp_path: Path, cli_repo: Path) -> tuple[Path, Path]:
    """A repository holding E1 (a small VM), and a folder to check hostile entries out into."""
    area = tmp_path / "src"
    make_area(area, disk=256 << 10)
    assert vml(cli_repo, "commit", "-q", area).code == 0
    return cli_repo, tmp_path


def _refused(world: tuple[Path, Path], edit: Edit, expect: str) -> Path:
    repo, base = world
    forge(repo, edit)
    outside = {k: v for k, v in snapshot(base).items() if not k.startswith("target")}
    target = base / "target"
    run = vml(repo, "checkout", "E2", target)
    line = one_line_error(run)
    assert run.code == 7, run
    assert expect in line, line
    after = {k: v for k, v in snapshot(base).items() if not k.startswith("target")}
    # Nothing written outside the area; the repository gains nothing but, when
    # the checkout began writing (it is then marked interrupted), the area's
    # name in its local list of areas.
    known = json.loads(after.pop("repo/vml/areas.json")[2] or b"{}")["areas"]
    was = json.loads(outside.pop("repo/vml/areas.json")[2] or b"{}")["areas"]
    assert set(known) - set(was) <= {str(target)}
    assert after == outside
    # E1 still checks out.
    assert vml(repo, "checkout", "-q", "E1", base / "fine").code == 0
    return target


def _meta_path(bad: str) -> Edit:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        files = meta["files"]
        assert isinstance(files, list)
        files[0]["path"] = bad

    return edit


@pytest.mark.parametrize(
    "bad",
    [
        "../evil",
        "/tmp/evil",
        "a/../../b",
        ".vml/area.json",
        "a\x00b",
        "",
        "a//b",
        "./x",
    ],
)
def test_unsafe_file_paths_are_refused(world: tuple[Path, Path], bad: str) -> None:
    target = _refused(world, _meta_path(bad), "unsafe path")
    assert not target.exists() or snapshot(target) == {}


def test_unsafe_folder_is_refused(world: tuple[Path, Path]) -> None:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        meta["dirs"] = ["../../outside"]

    _refused(world, edit, "unsafe path")


@pytest.mark.parametrize("mode", [0o120000, 0o160000, 0o040000])
def test_symlink_and_submodule_modes_in_the_tree_are_refused(
    world: tuple[Path, Path], mode: int
) -> None:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        files = git[root[b"files"][1]]
        assert isinstance(files, Tree)
        _, sha = files[b"vm.vmx"]
        if mode == 0o120000:  # a link to a file outside the area
            sha = _put(git, Blob.from_string(b"/etc/passwd"))
        root[b"files"] = (0o040000, _replace(git, files, [b"vm.vmx"], mode, sha))

    target = _refused(world, edit, "lacks the data of vm.vmx")
    assert not (target / "vm.vmx").is_symlink()


@pytest.mark.parametrize("mode", [0o104755, 0o120000, 0o100777, 0])
def test_file_modes_other_than_git_s_two_are_refused(world: tuple[Path, Path], mode: int) -> None:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        files = meta["files"]
        assert isinstance(files, list)
        files[0]["mode"] = mode

    _refused(world, edit, "malformed")


def test_tree_names_outside_the_metadata_are_never_written(world: tuple[Path, Path]) -> None:
    """Names like ``..`` in the ``files`` tree: only paths the metadata lists are written."""
    repo, base = world

    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        files = git[root[b"files"][1]]
        assert isinstance(files, Tree)
        evil = _put(git, Blob.from_string(b"evil"))
        for name in (b"..", b".vml", b"x\\y"):
            files[name] = (0o100644, evil)
        root[b"files"] = (0o040000, _put(git, files))

    forge(repo, edit)
    outside = snapshot(base)
    assert vml(repo, "checkout", "-q", "E2", base / "target").code == 0
    after = {k: v for k, v in snapshot(base).items() if not k.startswith("target")}
    after.pop("repo/vml/areas.json")
    outside.pop("repo/vml/areas.json")
    assert after == outside
    assert sorted(p.name for p in (base / "target").iterdir()) == [
        ".vml",
        "disk.img",
        "vm.nvram",
        "vm.vmx",
    ]


def _manifest_edit(change: Callable[[dict[str, object]], None]) -> Edit:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        path = [b"images", b"disk.img", b"manifest"]
        _, sha = _lookup(git, root, path)
        doc = json.loads(git[sha].as_raw_string())
        change(doc)
        new = _put(git, Blob.from_string(json.dumps(doc).encode()))
        root[b"images"] = (
            0o040000,
            _replace(git, git[root[b"images"][1]], path[1:], 0o100644, new),
        )
        for f in meta["files"]:  # type: ignore[attr-defined]
            if f["path"] == "disk.img" and "size" in doc:
                f["size"] = doc["size"]

    return edit


@pytest.mark.parametrize(
    "change",
    [
        {"size": 1 << 50},  # a petabyte
        {"size": 1 << 45, "block_size": 4096},  # 2^33 blocks to plan for
        {"block_size": 3 << 20},
        {"page_size": 1 << 30},
        {"zero": [[5, 2]]},
        {"zero": [[0, 1 << 40]]},
    ],
    ids=["petabyte", "block-count", "odd-block", "page", "zero-reversed", "zero-beyond"],
)
def test_implausible_manifests_are_refused(
    world: tuple[Path, Path], change: dict[str, object]
) -> None:
    target = _refused(world, _manifest_edit(lambda d: d.update(change)), "image manifest")
    assert not (target / "disk.img").exists()


def test_a_manifest_not_matching_the_file_record_writes_no_file(world: tuple[Path, Path]) -> None:
    def change(doc: dict[str, object]) -> None:
        doc["size"] = int(doc["size"]) + (64 << 10)  # type: ignore[call-overload]

    target = _refused(world, _manifest_edit(change), "")
    assert not (target / "disk.img").exists()


def test_a_block_both_zero_and_stored_is_refused(world: tuple[Path, Path]) -> None:
    """FORMAT.md: a layer never names a block in ``zero`` and in its block map."""
    target = _refused(
        world, _manifest_edit(lambda d: d.update(zero=[[0, 1]])), "both zero and stored"
    )
    assert not (target / "disk.img").exists()


def _block_edit(name: bytes, data: bytes) -> Edit:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        leaf_path = [b"images", b"disk.img", b"blocks", b"0000", b"00"]
        _, leaf_sha = _lookup(git, root, leaf_path)
        leaf = git[leaf_sha]
        assert isinstance(leaf, Tree)
        del leaf[b"00"]
        leaf[name] = (0o100644, _put(git, Blob.from_string(data)))
        images = git[root[b"images"][1]]
        assert isinstance(images, Tree)
        root[b"images"] = (
            0o040000,
            _replace(git, images, leaf_path[1:], 0o040000, _put(git, leaf)),
        )

    return edit


def test_a_block_of_the_wrong_size_is_refused(world: tuple[Path, Path]) -> None:
    target = _refused(world, _block_edit(b"00", b"short block"), "where 65536 belong")
    assert not (target / "disk.img").exists()


def test_a_delta_pointing_outside_its_block_is_refused(world: tuple[Path, Path]) -> None:
    delta = struct.pack(">4sBBHIII", MAGIC, 1, 0, 0, 4096, 65536, 1) + struct.pack(">I", 4000)
    delta += b"x" * 4096
    target = _refused(world, _block_edit(b"00.d", delta), "delta")
    assert not (target / "disk.img").exists()


def test_a_delta_claiming_a_huge_block_is_refused(world: tuple[Path, Path]) -> None:
    delta = struct.pack(">4sBBHIII", MAGIC, 1, 0, 0, 4096, 0xFFFFFFFF, 0)
    _refused(world, _block_edit(b"00.d", delta), "delta")


NEWER = "is newer than this vml understands; upgrade vml to read it"


def test_a_manifest_of_a_newer_format_says_so(world: tuple[Path, Path]) -> None:
    """An image written by a newer VML: the user is told to upgrade, not to hunt for damage."""
    target = _refused(
        world,
        _manifest_edit(lambda d: d.update(vml_manifest=3)),
        "image manifest format 3 " + NEWER,
    )
    assert not (target / "disk.img").exists()


def test_a_delta_of_a_newer_format_says_so(world: tuple[Path, Path]) -> None:
    delta = struct.pack(">4sBBHIII", MAGIC, 4, 0, 0, 4096, 65536, 0)
    target = _refused(world, _block_edit(b"00.d", delta), "delta blob format 4 " + NEWER)
    assert not (target / "disk.img").exists()


def test_entry_metadata_of_a_newer_format_says_so(world: tuple[Path, Path]) -> None:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        meta["vml_entry"] = 2

    _refused(world, edit, "entry metadata format 2 " + NEWER)


def test_a_symbolic_ref_cycle_is_refused_clearly(world: tuple[Path, Path]) -> None:
    repo, _base = world
    (repo / "refs" / "heads" / "a").write_text("ref: refs/heads/b\n")
    (repo / "refs" / "heads" / "b").write_text("ref: refs/heads/a\n")
    for args in (["log", "--all"], ["checkout", "E1", str(_base / "t")]):
        run = vml(repo, *args)
        assert run.code == 7
        assert "loops" in one_line_error(run)


def test_an_entry_ref_to_a_blob_is_refused(world: tuple[Path, Path]) -> None:
    repo, base = world
    git = Repo(str(repo))
    git.refs[b"refs/vml/entries/2"] = _put(git, Blob.from_string(b"not a commit"))
    git.close()
    run = vml(repo, "checkout", "E2", base / "t")
    assert run.code == 7
    assert "expected a commit" in one_line_error(run)


@pytest.mark.parametrize("vm", ["a string", {"hypervisor": 5}, {"disks": "none"}, [1, 2]])
def test_a_malformed_vm_description_shows_as_no_vm_and_breaks_no_listing(
    world: tuple[Path, Path], vm: object
) -> None:
    repo, _base = world

    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        meta["vm"] = vm

    forge(repo, edit)
    run = vml(repo, "log", "--json")
    assert run.code == 0, run
    by_id = {e["id"]: e for e in json.loads(run.out)}
    assert by_id["E2"]["vm"] is None and by_id["E1"]["vm"]["hypervisor"] == "vmware"
    run = vml(repo, "show", "E2")
    assert run.code == 0 and "chain     E2" in run.out, run
    assert vml(repo, "log").code == 0


def test_an_entry_of_a_newer_format_is_listed_as_such_and_the_log_goes_on(
    world: tuple[Path, Path],
) -> None:
    def edit(git: Repo, root: Tree, meta: dict[str, object]) -> None:
        meta["vml_entry"] = 2

    repo, _base = world
    forge(repo, edit)
    run = vml(repo, "log")
    assert "entry metadata format 2 is newer than this vml understands" in run.out + run.err, run
    assert "E1" in run.out
