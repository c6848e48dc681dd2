"""Manifests and block maps: round trips, fan-out names, hostile input refused."""

from __future__ import annotations

import json

import pytest
from dulwich.objects import Tree

from vml.errors import CorruptRepository, HostileRepository, NewerFormat
from vml.plumbing.manifests import (
    BLOB_MODE,
    TREE_MODE,
    Manifest,
    block_trees,
    parse_tree,
    ranges,
    read_block_map,
)

SHA = "ab" * 32


def test_manifest_round_trip() -> None:
    m = Manifest(10 * 65536 + 5, SHA, 65536, 4096, False, [(1, 3), (7, 11)])
    assert m.nblocks == 11
    assert m.block_length(10) == 5 and m.block_length(0) == 65536
    assert list(m.zero_blocks()) == [1, 2, 7, 8, 9, 10]
    back = Manifest.decode(m.encode())
    assert back == m
    assert json.loads(m.encode())["vml_manifest"] == 1


def test_empty_image_manifest() -> None:
    m = Manifest(0, SHA, 65536, 4096, True)
    assert m.nblocks == 0
    assert Manifest.decode(m.encode()) == m


def _doc(**kw: object) -> bytes:
    d: dict[str, object] = {
        "vml_manifest": 1,
        "size": 65536 * 4,
        "sha256": SHA,
        "block_size": 65536,
        "page_size": 4096,
        "base": True,
        "zero": [],
    }
    d.update(kw)
    return json.dumps(d).encode()


@pytest.mark.parametrize(
    ("doc", "err"),
    [
        (b"not json", CorruptRepository),
        (_doc(vml_manifest=3), NewerFormat),
        (_doc(size=-1), HostileRepository),
        (_doc(size=1 << 60), HostileRepository),
        (_doc(size="big"), CorruptRepository),
        (_doc(block_size=3000), HostileRepository),
        (_doc(page_size=1 << 17), HostileRepository),
        (_doc(sha256="xyz"), CorruptRepository),
        (_doc(base="yes"), CorruptRepository),
        (_doc(zero=[[0, 5]]), HostileRepository),  # beyond the 4 blocks
        (_doc(zero=[[2, 3], [0, 1]]), HostileRepository),  # not increasing
        (_doc(zero=[[1, 1]]), HostileRepository),  # empty range
    ],
)
def test_bad_manifests_refused(doc: bytes, err: type[Exception]) -> None:
    with pytest.raises(err):
        Manifest.decode(doc)
    if doc != b"not json":
        d = json.loads(doc)
        d.pop("zero")
        with pytest.raises(CorruptRepository):
            Manifest.decode(json.dumps(d).encode())


def test_ranges() -> None:
    assert ranges([]) == []
    assert ranges([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]


def _store(trees: list[Tree]) -> dict[bytes, bytes]:
    return {bytes.fromhex(t.id.decode()): t.as_raw_string() for t in trees}


def test_block_map_round_trip_and_fan_out() -> None:
    blocks = {
        0: (False, b"\x01" * 20),
        1: (True, b"\x02" * 20),
        255: (False, b"\x03" * 20),
        256: (True, b"\x04" * 20),
        70000: (False, b"\x05" * 20),
    }
    top, made = block_trees(blocks)
    assert top is not None and made[-1] is top
    store = _store(made)
    names = [n for n, _m, _s in parse_tree(top.as_raw_string())]
    assert names == [b"0000", b"0001"]  # 70000 >> 16 == 1
    leaf_names: list[bytes] = []
    for _n, _m, mid in parse_tree(top.as_raw_string()):
        for _n2, _m2, leaf in parse_tree(store[mid]):
            leaf_names += [n for n, _m3, _s in parse_tree(store[leaf])]
    assert b"00" in leaf_names and b"01.d" in leaf_names and b"ff" in leaf_names
    back = read_block_map(store.__getitem__, bytes.fromhex(top.id.decode()), 70001)
    assert back == blocks
    assert block_trees({}) == (None, [])


@pytest.mark.parametrize("version", [0, -1, "2", 2.0, True, None, 10**6, 10**400])
def test_only_a_plausible_larger_version_is_called_newer(version: object) -> None:
    """A newer VML's manifest says "upgrade"; anything else is an unknown format, never "newer"."""
    with pytest.raises(CorruptRepository) as e:
        Manifest.decode(_doc(vml_manifest=version))
    assert not isinstance(e.value, NewerFormat)
    assert "unknown format" in e.value.message
    with pytest.raises(NewerFormat, match="image manifest format 7 is newer"):
        Manifest.decode(_doc(vml_manifest=7))


def test_block_map_beyond_the_file_refused() -> None:
    top, made = block_trees({10: (False, b"\x01" * 20)})
    assert top is not None
    with pytest.raises(HostileRepository, match="beyond"):
        read_block_map(_store(made).__getitem__, bytes.fromhex(top.id.decode()), 10)


def test_block_map_with_strange_names_refused() -> None:
    leaf = Tree()
    leaf.add(b"../x", BLOB_MODE, b"1" * 40)
    mid = Tree()
    mid.add(b"00", TREE_MODE, leaf.id)
    top = Tree()
    top.add(b"0000", TREE_MODE, mid.id)
    with pytest.raises(HostileRepository):
        read_block_map(_store([leaf, mid, top]).__getitem__, bytes.fromhex(top.id.decode()), 10)
    bad_top = Tree()
    bad_top.add(b"zz", TREE_MODE, mid.id)
    with pytest.raises(HostileRepository):
        read_block_map(_store([bad_top]).__getitem__, bytes.fromhex(bad_top.id.decode()), 10)


def test_malformed_tree() -> None:
    with pytest.raises(CorruptRepository):
        parse_tree(b"100644 name-without-nul")
