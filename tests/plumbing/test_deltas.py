"""Page deltas: encode/apply round trip, and hostile deltas refused."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vml.errors import CorruptRepository, NewerFormat
from vml.plumbing.deltas import MAGIC, ZERO_PAGE, apply_delta, delta_header, encode_delta

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
        _raw(PAGE, 2 * PAGE, [], b"", 3),  # unknown version
    ],
)
def test_hostile_deltas_refused(blob: bytes) -> None:
    with pytest.raises(CorruptRepository):
        delta_header(blob)


def test_a_delta_of_a_newer_version_says_so() -> None:
    with pytest.raises(NewerFormat, match="delta blob format 3 is newer"):
        delta_header(_raw(PAGE, 2 * PAGE, [], b"", 3))
    with pytest.raises(CorruptRepository) as e:
        delta_header(_raw(PAGE, 2 * PAGE, [], b"", 0))
    assert not isinstance(e.value, NewerFormat)
