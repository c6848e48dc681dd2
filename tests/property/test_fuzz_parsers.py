"""Fuzzing the parsers that read repository data: any bytes give a result or a VMLError.

A repository may come from someone else, so the manifest, block-map, delta
and entry-metadata parsers must refuse every malformed input with a
:class:`~vml.errors.CorruptRepository` (never another exception, never a
write outside the block, never an allocation the input merely claims).
"""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vml.errors import CorruptRepository
from vml.plumbing.deltas import MAGIC, apply_delta, delta_header, encode_delta
from vml.plumbing.entries import EntryMeta
from vml.plumbing.manifests import MAX_IMAGE_SIZE, Manifest, read_block_map

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values, with the odd ones JSON allows: huge and non-finite numbers, deep nesting.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 80), max_value=1 << 80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _valid_manifest() -> dict[str, object]:
    return {
        "vml_manifest": 1,
        "size": 3 << 16,
        "sha256": "ab" * 32,
        "block_size": 1 << 16,
        "page_size": 4096,
        "base": True,
        "zero": [[0, 1]],
    }


def _valid_meta() -> dict[str, object]:
    return {
        "vml_entry": 1,
        "kind": "full",
        "parent": None,
        "area": "/a",
        "area_id": "x",
        "created": "2024-01-01T00:00:00+00:00",
        "message": "",
        "files": [
            {
                "path": "disk.img",
                "kind": "image",
                "mode": 0o100644,
                "mtime_ns": 1,
                "size": 10,
                "sha256": "cd" * 32,
            }
        ],
        "dirs": [],
        "vm": None,
        "stats": {},
    }


def _check_manifest(data: bytes) -> None:
    try:
        m = Manifest.decode(data)
    except CorruptRepository:
        return
    assert 0 <= m.size <= MAX_IMAGE_SIZE
    assert m.page_size <= m.block_size
    for a, b in m.zero:
        assert 0 <= a < b <= m.nblocks


@FUZZ
@given(st.binary(max_size=300))
def test_manifest_decode_random_bytes(data: bytes) -> None:
    _check_manifest(data)


@FUZZ
@given(st.sampled_from(sorted(_valid_manifest())), json_values)
def test_manifest_decode_one_field_replaced(key: str, value: object) -> None:
    doc = _valid_manifest()
    doc[key] = value
    _check_manifest(json.dumps(doc).encode())


def test_manifest_decode_deep_nesting() -> None:
    _check_manifest(b"[" * 100_000 + b"]" * 100_000)
    _check_manifest(b'{"vml_manifest": 1, "zero": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def _check_meta(data: bytes) -> None:
    try:
        meta = EntryMeta.decode(data)
    except CorruptRepository:
        return
    for f in meta.files:
        assert not f.path.startswith("/") and ".." not in f.path.split("/")
        assert f.mode in (0o100644, 0o100755)
        assert f.size >= 0


@FUZZ
@given(st.binary(max_size=300))
def test_entry_meta_random_bytes(data: bytes) -> None:
    _check_meta(data)


@FUZZ
@given(
    st.sampled_from(
        [
            *sorted(_valid_meta()),
            "file." + "path",
            "file.mode",
            "file.size",
            "file.mtime_ns",
            "file.sha256",
            "file.kind",
        ]
    ),
    json_values,
)
def test_entry_meta_one_field_replaced(key: str, value: object) -> None:
    doc = _valid_meta()
    if key.startswith("file."):
        doc["files"][0][key[5:]] = value  # type: ignore[index]
    else:
        doc[key] = value
    _check_meta(json.dumps(doc).encode())


def test_entry_meta_deep_nesting() -> None:
    _check_meta(b"[" * 100_000 + b"]" * 100_000)


# -- delta blobs --


@FUZZ
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=1 << 16))
def test_delta_random_bytes(data: bytes, base_len: int) -> None:
    base = bytearray(base_len)
    for blob in (data, MAGIC + b"\x01\x00\x00\x00" + data):
        try:
            delta_header(blob)
            apply_delta(base, blob)
        except CorruptRepository:
            pass
        assert len(base) == base_len  # never grows or shrinks the block


@FUZZ
@given(
    st.integers(min_value=1, max_value=64),  # pages in the block
    st.data(),
)
def test_delta_mutated_header(npages: int, data: st.DataObject) -> None:
    page = 512
    block = bytes(range(256)) * (npages * page // 256)
    pages = sorted(data.draw(st.sets(st.integers(0, npages - 1), max_size=npages)))
    blob = bytearray(encode_delta(block, pages, page))
    # Overwrite one header field or page number with anything.
    pos = data.draw(st.integers(0, min(len(blob), 20 + 4 * len(pages)) - 4))
    blob[pos : pos + 4] = struct.pack(">I", data.draw(st.integers(0, (1 << 32) - 1)))
    base = bytearray(len(block))
    try:
        apply_delta(base, bytes(blob))
    except CorruptRepository:
        return
    assert len(base) == len(block)


# -- block maps --

names = st.one_of(
    st.sampled_from([b"0000", b"00", b"01", b"00.d", b"ff", b"..", b"/", b"0000/00", b"ffff"]),
    st.binary(min_size=1, max_size=6).filter(lambda b: b"\0" not in b and b" " not in b),
)
modes = st.sampled_from([0o040000, 0o100644, 0o100755, 0o120000, 0o160000, 0o644])


def _raw_tree(items: list[tuple[bytes, int, bytes]]) -> bytes:
    return b"".join(b"%o %s\0%s" % (mode, name, sha) for name, mode, sha in items)


@FUZZ
@given(
    st.dictionaries(
        st.binary(min_size=20, max_size=20),
        st.one_of(
            st.lists(st.tuples(names, modes, st.binary(min_size=20, max_size=20)), max_size=5).map(
                _raw_tree
            ),
            st.binary(max_size=60),
        ),
        max_size=6,
    ),
    st.binary(min_size=20, max_size=20),
    st.integers(min_value=0, max_value=1 << 20),
)
def test_block_map_random_trees(trees: dict[bytes, bytes], top: bytes, nblocks: int) -> None:
    def read_tree(sha: bytes) -> bytes:
        if sha not in trees:
            raise CorruptRepository("missing")
        return trees[sha]

    try:
        out = read_block_map(read_tree, top, nblocks)
    except CorruptRepository:
        return
    assert all(0 <= n < nblocks for n in out)
