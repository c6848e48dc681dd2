"""Entries: metadata round trip, trailers, path safety, commits git reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.plumbing.entry_kit import save
from vml.errors import CorruptRepository, HostileRepository, NewerFormat
from vml.plumbing.entries import (
    EntryMeta,
    FileRecord,
    check_relpath,
    load_entry,
    lookup_path,
    make_commit,
    message_body,
    nested_trees,
    parse_trailers,
)
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository

SHA = "cd" * 32


def _meta(**kw: object) -> EntryMeta:
    m = EntryMeta(
        kind="incremental",
        parent="ab" * 20,
        area="/tmp/area",
        area_id="x",
        created="2026-01-01T00:00:00+00:00",
        message="hello",
        files=[FileRecord("a/b.img", "image", 0o100644, 123, 1 << 20, SHA)],
        dirs=["empty"],
        stats={"stored_bytes": 5},
    )
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def test_meta_round_trip() -> None:
    m = _meta()
    assert EntryMeta.decode(m.encode()) == m
    assert json.loads(m.encode())["vml_entry"] == 1


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "../x", "a/../b", "a//b", ".vml/area.json", "a\0b", "./a"]
)
def test_unsafe_paths_refused(path: str) -> None:
    with pytest.raises(HostileRepository):
        check_relpath(path)
    bad = _meta(files=[FileRecord(path, "small", 0o100644, 0, 1, SHA)])
    with pytest.raises(CorruptRepository):  # HostileRepository is one
        EntryMeta.decode(bad.encode())


def test_safe_paths() -> None:
    for p in ("disk.img", "sub/dir/x.vmdk", "a..b", ".hidden"):
        assert check_relpath(p) == p


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "weird"},
        {"files": [{"path": "x"}]},
        {"vml_entry": 9},
    ],
)
def test_malformed_meta(change: dict[str, object]) -> None:
    doc = json.loads(_meta().encode())
    doc.update(change)
    with pytest.raises(CorruptRepository):
        EntryMeta.decode(json.dumps(doc).encode())
    with pytest.raises(CorruptRepository):
        EntryMeta.decode(b"[1, 2]")


def test_metadata_of_a_newer_version_says_so() -> None:
    doc = json.loads(_meta().encode())
    doc["vml_entry"] = 2
    with pytest.raises(NewerFormat, match="entry metadata format 2 is newer"):
        EntryMeta.decode(json.dumps(doc).encode())


def test_trailers_and_body() -> None:
    c = make_commit(b"\x01" * 20, None, "my state\n\nmore text", [("VML-Entry", "E3")], when=1000)
    assert parse_trailers(c.message) == {"VML-Entry": "E3"}
    assert message_body(c.message) == "my state\n\nmore text"
    assert c.parents == []
    empty = make_commit(b"\x01" * 20, b"\x02" * 20, "", [("VML-Kind", "full")])
    assert message_body(empty.message) == "VML entry"
    assert empty.parents == [b"02" * 20]


def test_nested_trees_conflict() -> None:
    with pytest.raises(ValueError):
        nested_trees({"a": (0o100644, b"\x01" * 20), "a/b": (0o100644, b"\x01" * 20)})


def test_entry_written_by_commit(repo: Repository, area: Path) -> None:
    (area / "sub").mkdir()
    (area / "sub" / "note.txt").write_text("x")
    (area / "empty").mkdir()
    res = save(repo, area, message="first state")
    r = PackReader(repo)
    try:
        read = lambda sha, t: r.read(sha, t)[1]  # noqa: E731
        e = load_entry(read, bytes.fromhex(res.commit))
        assert e.parent is None and e.meta.kind == "full" and e.message == "first state"
        assert e.trailers["VML-Entry"] == "E1" and e.trailers["VML-Kind"] == "full"
        kinds = {f.path: f.kind for f in e.meta.files}
        assert kinds == {
            "disk.img": "image",
            "sub/note.txt": "small",
            "vm.nvram": "small",
            "vm.vmx": "small",
        }
        assert e.meta.dirs == ["empty"]
        assert lookup_path(read, e.tree, "files/sub/note.txt") is not None
        assert lookup_path(read, e.tree, "images/disk.img/manifest") is not None
        assert lookup_path(read, e.tree, "files/nope") is None
        with pytest.raises(CorruptRepository, match="not a VML entry"):
            # the metadata blob's tree is not a commit: use a tree-only commit
            from dulwich.objects import Tree

            from vml.plumbing.packwriter import write_loose

            t = Tree()
            write_loose(repo, t)
            c = make_commit(bytes.fromhex(t.id.decode()), None, "x", [])
            cid = write_loose(repo, c)
            load_entry(read, cid)
    finally:
        r.close()
