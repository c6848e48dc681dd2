"""Page deltas: encode/apply round trip, and hostile deltas refused."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vml.errors import CorruptRepository, NewerFormat
from vml.plumbing.deltas import (
    MAGIC,
    REF_PAGE,
    ZERO_PAGE,
    apply_delta,
    delta_header,
    encode_delta,
    own_data_at,
    parse_delta,
)

PAGE = 4096


@settings(max_examples=50, deadline=None)
@given(
    npages=st.integers(1, 16),
    tail=st.integers(0, PAGE - 1),
    data=st.data(),
)
def test_round_trip(npages: int, tail: int, data: st.DataObject) -> None:
    length = npages * PAGE - tail
    old = bytes(length)
    new = bytearray(old)
    total = (length + PAGE - 1) // PAGE
    pages = sorted(data.draw(st.sets(st.integers(0, total - 1), max_size=total)))
    for p in pages:
        start = p * PAGE
        n = min(PAGE, length - start)
        new[start : start + n] = os.urandom(n)
    blob = encode_delta(bytes(new), pages, PAGE)
    assert delta_header(blob) == (PAGE, length, pages)
    buf = bytearray(old)
    apply_delta(buf, blob)
    assert buf == new


@settings(max_examples=50, deadline=None)
@given(npages=st.integers(1, 16), data=st.data())
def test_round_trip_with_zero_pages(npages: int, data: st.DataObject) -> None:
    length = npages * PAGE
    old = os.urandom(length)
    new = bytearray(old)
    chosen = sorted(data.draw(st.sets(st.integers(0, npages - 1), max_size=npages)))
    zero = [p for p in chosen if data.draw(st.booleans())]
    pages = [p for p in chosen if p not in zero]
    for p in pages:
        new[p * PAGE : (p + 1) * PAGE] = os.urandom(PAGE)
    for p in zero:
        new[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
    blob = encode_delta(bytes(new), pages, PAGE, zero)
    # A zero page costs its number only: a delta's size is what a restore reads.
    assert len(blob) == 20 + 4 * len(chosen) + PAGE * len(pages)
    assert blob[4] == (2 if zero else 1)
    assert own_data_at(blob, 0) == parse_delta(blob).data_at
    buf = bytearray(old)
    apply_delta(buf, blob)
    assert buf == new


def test_small_change_small_delta() -> None:
    block = bytearray(os.urandom(1 << 20))
    blob = encode_delta(bytes(block), [7], PAGE)
    assert len(blob) < PAGE + 64


def test_wrong_base_length() -> None:
    blob = encode_delta(bytes(2 * PAGE), [1], PAGE)
    with pytest.raises(CorruptRepository, match="parent block"):
        apply_delta(bytearray(PAGE), blob)


def _raw(page: int, length: int, pages: list[int], body: bytes, version: int = 1) -> bytes:
    head = struct.pack(">4sBBHIII", MAGIC, version, 0, 0, page, length, len(pages))
    return head + struct.pack(f">{len(pages)}I", *pages) + body


@pytest.mark.parametrize(
    "blob",
    [
        b"VMLD",  # truncated
        _raw(PAGE, PAGE, [], b"").replace(b"VMLD", b"XXXX"),  # magic
        _raw(1000, PAGE, [], b""),  # page size not a power of two
        _raw(PAGE, 0, [], b""),  # empty block
        _raw(PAGE, 1 << 30, [], b""),  # huge block
        _raw(PAGE, PAGE, [0, 1], b"x" * 2 * PAGE),  # more pages than the block has
        _raw(PAGE, 2 * PAGE, [1, 1], b"x" * 2 * PAGE),  # not increasing
        _raw(PAGE, 2 * PAGE, [2], b"x" * PAGE),  # outside
        _raw(PAGE, 2 * PAGE, [0], b"x" * 10),  # short body
        _raw(PAGE, 2 * PAGE, [0], b"x" * (PAGE + 1)),  # long body
        _raw(PAGE, 2 * PAGE, [0 | ZERO_PAGE], b""),  # a zero page in a version 1 delta
        _raw(PAGE, 2 * PAGE, [2 | ZERO_PAGE], b"", 2),  # zero page outside
        _raw(PAGE, 2 * PAGE, [1 | ZERO_PAGE, 0], b"x" * PAGE, 2),  # not increasing
        _raw(PAGE, 2 * PAGE, [0 | ZERO_PAGE], b"x" * PAGE, 2),  # a zero page with bytes
        _raw(PAGE, 2 * PAGE, [], b"", 3),  # version 3 without a reference
        _raw(PAGE, 2 * PAGE, [], b"", 9),  # unknown version
    ],
)
def test_hostile_deltas_refused(blob: bytes) -> None:
    with pytest.raises(CorruptRepository):
        delta_header(blob)


def test_a_delta_of_a_newer_version_says_so() -> None:
    with pytest.raises(NewerFormat, match="delta blob format 4 is newer"):
        delta_header(_raw(PAGE, 2 * PAGE, [], b"", 4))
    with pytest.raises(CorruptRepository) as e:
        delta_header(_raw(PAGE, 2 * PAGE, [], b"", 0))
    assert not isinstance(e.value, NewerFormat)


def _sources(blobs: dict[bytes, bytes]):  # type: ignore[no-untyped-def]
    def read(sha: bytes, off: int, n: int) -> bytes:
        return blobs[sha][off : off + n]

    return read


@settings(max_examples=50, deadline=None)
@given(npages=st.integers(1, 16), tail=st.integers(0, PAGE - 1), data=st.data())
def test_round_trip_with_references(npages: int, tail: int, data: st.DataObject) -> None:
    """Version 3: pages whose bytes are a source's, at any byte offset, beside data and zero pages."""
    length = npages * PAGE - tail
    src = {b"\x01" * 20: os.urandom(3 * PAGE + 7), b"\x02" * 20: os.urandom(PAGE)}
    old = os.urandom(length)
    new = bytearray(old)
    total = (length + PAGE - 1) // PAGE
    chosen = sorted(data.draw(st.sets(st.integers(0, total - 1), min_size=1, max_size=total)))
    kinds = {p: data.draw(st.sampled_from(["data", "zero", "ref"])) for p in chosen}
    kinds[chosen[0]] = "ref"
    refs = {}
    for p, kind in kinds.items():
        start = p * PAGE
        n = min(PAGE, length - start)
        if kind == "data":
            new[start : start + n] = os.urandom(n)
        elif kind == "zero":
            new[start : start + n] = bytes(n)
        else:
            sha = data.draw(st.sampled_from(sorted(src)))
            off = data.draw(st.integers(0, len(src[sha]) - n))
            refs[p] = (sha, off)
            new[start : start + n] = src[sha][off : off + n]
    pages = [p for p, k in kinds.items() if k == "data"]
    zero = [p for p, k in kinds.items() if k == "zero"]
    blob = encode_delta(bytes(new), pages, PAGE, zero, refs)
    assert blob[4] == 3
    d = parse_delta(blob)
    assert own_data_at(blob, len(refs)) == d.data_at  # what a save keeps of its deltas
    assert set(d.sources) == {s for s, _ in refs.values()}
    assert {p: w for p, w in d.places().items() if w is not None and w[0]} == refs
    # A reference costs 16 bytes (its number and where), a zero page 4.
    assert len(blob) == 20 + 20 * len(d.sources) + 4 * len(chosen) + 12 * len(refs) + sum(
        min(PAGE, length - p * PAGE) for p in pages
    )
    buf = bytearray(old)
    apply_delta(buf, blob, _sources(src))
    assert buf == new
    # A data page's place is its bytes in the blob.
    for p, w in d.places().items():
        if w is not None and not w[0]:
            n = min(PAGE, length - p * PAGE)
            assert blob[w[1] : w[1] + n] == new[p * PAGE : p * PAGE + n]


def test_references_need_a_reader_and_a_source_that_holds_the_bytes() -> None:
    new = os.urandom(2 * PAGE)
    sha = b"\x05" * 20
    blob = encode_delta(new, [], PAGE, (), {1: (sha, 10)})
    with pytest.raises(CorruptRepository, match="nobody can read"):
        apply_delta(bytearray(2 * PAGE), blob)
    with pytest.raises(CorruptRepository, match="does not hold"):
        apply_delta(bytearray(2 * PAGE), blob, _sources({sha: b"x" * 100}))


def _raw3(
    sources: list[bytes], pages: list[int], refs: list[tuple[int, int]], body: bytes
) -> bytes:
    head = struct.pack(">4sBBHIII", MAGIC, 3, 0, len(sources), PAGE, 2 * PAGE, len(pages))
    out = head + b"".join(sources) + struct.pack(f">{len(pages)}I", *pages)
    return out + b"".join(struct.pack(">IQ", i, o) for i, o in refs) + body


A, B = b"\x01" * 20, b"\x02" * 20


@pytest.mark.parametrize(
    "blob",
    [
        _raw3([A], [0 | REF_PAGE], [(1, 0)], b""),  # source index out of range
        _raw3([B, A], [0 | REF_PAGE, 1 | REF_PAGE], [(0, 0), (1, 0)], b""),  # sources unsorted
        _raw3([A, B], [0 | REF_PAGE], [(0, 0)], b""),  # a source listed, not used
        _raw3([A], [0 | REF_PAGE | ZERO_PAGE], [(0, 0)], b""),  # both flags
        _raw3([A], [0 | REF_PAGE], [], b""),  # truncated reference
        _raw3([A], [0 | REF_PAGE], [(0, 0)], b"x"),  # bytes after the last reference
        _raw3([A], [1 | REF_PAGE, 0], [(0, 0)], b"x" * PAGE),  # not increasing
        _raw3([A] * 65, [0 | REF_PAGE], [(0, 0)], b""),  # too many sources
        _raw(PAGE, 2 * PAGE, [0 | REF_PAGE], struct.pack(">IQ", 0, 0), 2),  # a reference in v2
    ],
)
def test_hostile_reference_deltas_refused(blob: bytes) -> None:
    with pytest.raises(CorruptRepository):
        parse_delta(blob)


def test_a_run_of_references_to_adjacent_bytes_is_one_read() -> None:
    """Adjacent pages referencing adjacent bytes of one source: one read; anything else breaks the run."""
    a, b = b"\x01" * 20, b"\x02" * 20
    src = {a: os.urandom(8 * PAGE), b: os.urandom(8 * PAGE)}
    length = 8 * PAGE - 100  # the run reaches the block's short last page
    refs = {
        0: (a, 0),  # 0-2: one run
        1: (a, PAGE),
        2: (a, 2 * PAGE),
        3: (a, 5 * PAGE),  # not adjacent bytes: a run of its own
        4: (b, 6 * PAGE),  # another source
        5: (a, 3 * PAGE + 7),  # 5-7: adjacent bytes, not page-aligned, the last page short
        6: (a, 4 * PAGE + 7),
        7: (a, 5 * PAGE + 7),
    }
    new = bytearray(length)
    for p, (sha, off) in refs.items():
        n = min(PAGE, length - p * PAGE)
        new[p * PAGE : p * PAGE + n] = src[sha][off : off + n]
    blob = encode_delta(bytes(new), [], PAGE, (), refs)
    reads: list[tuple[bytes, int, int]] = []

    def read(sha: bytes, off: int, n: int) -> bytes:
        reads.append((sha, off, n))
        return src[sha][off : off + n]

    buf = bytearray(length)
    apply_delta(buf, blob, read)
    assert buf == new
    assert reads == [
        (a, 0, 3 * PAGE),
        (a, 5 * PAGE, PAGE),
        (b, 6 * PAGE, PAGE),
        (a, 3 * PAGE + 7, 3 * PAGE - 100),
    ]
    # A page a newer delta overwrites splits the run and is not read.
    reads.clear()
    buf = bytearray(length)
    apply_delta(buf, blob, read, skip={1})
    assert reads[:2] == [(a, 0, PAGE), (a, 2 * PAGE, PAGE)]
    # A source that runs out inside the run is refused.
    short = {a: src[a][: 2 * PAGE], b: src[b]}
    with pytest.raises(CorruptRepository, match="does not hold"):
        apply_delta(bytearray(length), blob, lambda sha, off, n: short[sha][off : off + n])


def test_a_parsed_delta_gives_its_pages_numbers_kinds_and_references_in_order() -> None:
    a, b = b"\x01" * 20, b"\x02" * 20
    new = bytearray(os.urandom(8 * PAGE))
    new[2 * PAGE : 3 * PAGE] = bytes(PAGE)
    refs = {1: (b, 0), 5: (a, 7), 6: (b, PAGE)}
    blob = encode_delta(bytes(new), [0, 4, 7], PAGE, [2], refs)
    d = parse_delta(blob)
    assert d.numbers == [0, 1, 2, 4, 5, 6, 7]
    assert d.pages == [0, 1 | REF_PAGE, 2 | ZERO_PAGE, 4, 5 | REF_PAGE, 6 | REF_PAGE, 7]
    assert d.ref_pages == [1, 5, 6]
    assert [(d.sources[i], off) for i, off in d.refs] == [refs[1], refs[5], refs[6]]
    # Only its start, cut anywhere past its header, parses the same.
    head = parse_delta(blob[: d.data_at + 100], header_only=True)
    assert (head.numbers, head.kinds, head.refs) == (d.numbers, d.kinds, d.refs)
    with pytest.raises(CorruptRepository):
        parse_delta(blob[: d.data_at - 1], header_only=True)
