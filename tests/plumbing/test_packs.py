"""Packs VML writes: real git packs that git and dulwich read, ids verified on read."""

from __future__ import annotations

import os
import random
import subprocess
import zlib
from pathlib import Path

import pytest
from dulwich.object_format import DEFAULT_OBJECT_FORMAT
from dulwich.objects import Blob, Tree
from dulwich.pack import load_pack_index

from tests.conftest import need
from vml.errors import CorruptRepository
from vml.plumbing.packreader import BLOB, COMMIT, PackReader, _inflate_stored, blob_id
from vml.plumbing.packwriter import PackWriter, deflate, stored, write_loose
from vml.plumbing.repository import Repository


def test_blob_id_matches_git() -> None:
    assert blob_id(b"hello\n").hex() == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert blob_id(b"").hex() == Blob.from_string(b"").id.decode()


def test_deflate_is_zlib_and_stores_random_data() -> None:
    text = b"line of text\n" * 1000
    assert zlib.decompress(deflate(text)) == text
    assert len(deflate(text)) < len(text) // 10
    rnd = os.urandom(64 << 10)
    z = deflate(rnd)
    assert zlib.decompress(z) == rnd
    assert len(z) < len(rnd) + 1024  # stored, not inflated by compression


@pytest.mark.parametrize(("symbols", "kept"), [(180, True), (128, False)])
def test_deflate_stores_a_block_its_probes_find_barely_compressible(
    symbols: int, kept: bool
) -> None:
    # Bytes of 180 values compress to ~95% (not worth a full pass: stored),
    # of 128 values to ~88% (compressed).
    rng = random.Random(symbols)
    data = bytes(rng.randrange(symbols) for _ in range(1 << 20))
    z = deflate(data)
    assert zlib.decompress(z) == data
    assert (z == stored(data)) == kept
    assert kept or len(z) < len(data) * 0.9


@pytest.mark.parametrize("size", [0, 1, 65534, 65535, 65536, 3 * 65535, 1 << 20])
def test_stored_is_a_zlib_stream_of_the_bytes(size: int) -> None:
    data = os.urandom(size)
    z = stored(data)
    assert zlib.decompress(z) == data
    assert _inflate_stored(z, size) == data  # the fast reading path takes it
    assert len(z) == 2 + 5 * max(1, -(-size // 65535)) + size + 4
    assert zlib.decompress(stored(memoryview(data)[1:])) == data[1:]


def test_write_and_read_back(repo: Repository) -> None:
    w = PackWriter(repo)
    datas = [os.urandom(70_000), b"abc" * 30_000, b"", bytes(65536)]
    ids = [w.add_blob(d) for d in datas]
    assert w.add_blob(datas[0]) == ids[0]  # duplicates are written once
    assert w.count == 4
    tree = Tree()
    tree.add(b"x", 0o100644, Blob.from_string(datas[1]).id)
    tid = w.add_object(tree)
    name = w.finish()
    assert name is not None and (repo.objects_dir / "pack" / f"{name}.idx").exists()
    assert not list((repo.objects_dir / "pack").glob("tmp_*"))
    r = PackReader(repo)
    try:
        for sha, d in zip(ids, datas, strict=True):
            assert r.read(sha, BLOB) == (BLOB, d)
            assert r.in_packs(sha) and r.contains(sha)
        assert r.read(tid)[0] == 2
        with pytest.raises(CorruptRepository, match="expected a tree"):
            r.read(ids[0], 2)
        with pytest.raises(CorruptRepository, match="missing"):
            r.read(b"\x01" * 20)
    finally:
        r.close()


def test_git_verifies_the_pack(repo: Repository) -> None:
    need("git")
    w = PackWriter(repo)
    for i in range(20):
        w.add_blob(os.urandom(1000 + i * 5000))
    name = w.finish()
    out = subprocess.run(
        ["git", "verify-pack", "-v", str(repo.objects_dir / "pack" / f"{name}.idx")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "blob" in out.stdout


def test_empty_writer_leaves_nothing(repo: Repository) -> None:
    w = PackWriter(repo)
    assert w.finish() is None
    assert list((repo.objects_dir / "pack").iterdir()) == []


def test_abort_leaves_nothing(repo: Repository) -> None:
    w = PackWriter(repo)
    w.add_blob(b"data" * 1000)
    w.abort()
    assert list((repo.objects_dir / "pack").iterdir()) == []


def test_damaged_object_is_reported(repo: Repository) -> None:
    w = PackWriter(repo)
    data = b"\x00\x01" * 20_000  # compressible: corrupting the stream is detected
    sha = w.add_blob(os.urandom(4000) + data)
    name = w.finish()
    pack = repo.objects_dir / "pack" / f"{name}.pack"
    raw = bytearray(pack.read_bytes())
    raw[40] ^= 0xFF  # inside the object's zlib stream
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(raw))
    r = PackReader(repo)
    try:
        with pytest.raises(CorruptRepository):
            r.read(sha)
    finally:
        r.close()


def test_loose_commit_object(repo: Repository) -> None:
    blob = Blob.from_string(b"loose")
    sha = write_loose(repo, blob)
    assert (repo.objects_dir / sha.hex()[:2] / sha.hex()[2:]).exists()
    r = PackReader(repo)
    try:
        assert r.contains(sha) and not r.in_packs(sha)
        assert r.read(sha, BLOB)[1] == b"loose"
    finally:
        r.close()
    assert write_loose(repo, blob) == sha  # idempotent


def test_a_damaged_loose_commit_is_damage_unless_a_pack_holds_it_whole(repo: Repository) -> None:
    """Commits are read from their loose file first: a damaged one is never taken for it.

    Damaged alone, it is reported; with an intact copy in a pack (a ``git gc``
    packed it, the loose file stayed), the packed copy is read.
    """
    from vml.plumbing.entries import make_commit

    commit = make_commit(b"\x01" * 20, None, "m", [("VML-Entry", "E1")])
    sha = write_loose(repo, commit)
    path = repo.objects_dir / sha.hex()[:2] / sha.hex()[2:]
    r = PackReader(repo)
    try:
        assert r.read(sha, COMMIT)[1] == commit.as_raw_string()
    finally:
        r.close()
    raw = zlib.decompress(path.read_bytes()).replace(b"\nm", b"\nM")
    os.chmod(path, 0o644)
    path.write_bytes(zlib.compress(raw))
    r = PackReader(repo)
    try:
        with pytest.raises(CorruptRepository, match="damaged"):
            r.read(sha, COMMIT)
    finally:
        r.close()
    w = PackWriter(repo)
    w.add_object(commit)
    w.finish()
    r = PackReader(repo)
    try:
        assert r.read(sha, COMMIT)[1] == commit.as_raw_string()
    finally:
        r.close()


def test_reader_sees_packs_after_refresh(repo: Repository) -> None:
    r = PackReader(repo)
    try:
        w = PackWriter(repo)
        sha = w.add_blob(b"later")
        w.finish()
        assert not r.in_packs(sha)
        r.refresh()
        assert r.read(sha)[1] == b"later"
    finally:
        r.close()


def _padded_stream(data: bytes) -> bytes:
    """A valid zlib stream far longer than ``data``: a full flush after every byte."""
    c = zlib.compressobj(6)
    out = [c.compress(data[i : i + 1]) + c.flush(zlib.Z_FULL_FLUSH) for i in range(len(data))]
    return b"".join(out) + c.flush()


@pytest.mark.parametrize("size", [100, 3000])
def test_an_object_whose_stream_is_longer_than_its_data_reads_back(
    repo: Repository, size: int
) -> None:
    # A reader inflates what one read of about the object's size brings in
    # one call; a stream longer than that (another zlib writer's, full
    # flushes) must still read whole, through the streaming path.
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    z = _padded_stream(data)
    assert len(z) > len(data) + (len(data) >> 6) + 64 and zlib.decompress(z) == data
    w = PackWriter(repo)
    sha = blob_id(data)
    w.add_compressed(BLOB, sha, len(data), z)
    w.finish()
    r = PackReader(repo)
    try:
        assert r.read(sha, BLOB) == (BLOB, data)
        assert r.read(sha, BLOB, verify=False) == (BLOB, data)
    finally:
        r.close()


def test_a_damaged_stream_is_reported_without_the_id_check(repo: Repository) -> None:
    # Restores read blocks with verify=False (the block's checks catch bad
    # bytes): a stream that does not inflate to its size must still be refused.
    data = b"abc" * 30_000
    w = PackWriter(repo)
    good = deflate(data)
    cut = good[: len(good) // 2]
    header = bytes([good[0], good[1] ^ 1])  # not a zlib header
    for bad, size in ((good, len(data) - 1), (cut, len(data)), (header + good[2:], len(data))):
        sha = blob_id(bad + bytes([size & 255]))  # any id: the check is skipped
        w.add_compressed(BLOB, sha, size, bad)
        w.finish()
        _unchecked_read_fails(repo, sha)
        w = PackWriter(repo)
    w.abort()


def test_a_streams_adler32_is_left_to_the_id_or_the_callers_check(repo: Repository) -> None:
    # Inflating skips the stream's Adler-32 (the object id, or a restore's
    # block check, covers the bytes): a wrong one over intact bytes reads them,
    # and damage to the bytes themselves is the id check's to find.
    data = os.urandom(1000) * 100
    good = deflate(data)
    assert len(good) < len(data) // 10  # deflated, not stored
    bad_sum = good[:-1] + bytes([good[-1] ^ 1])
    sha = blob_id(data)
    w = PackWriter(repo)
    w.add_compressed(BLOB, sha, len(data), bad_sum)
    w.finish()
    r = PackReader(repo)
    try:
        assert r.read(sha, BLOB)[1] == data
        assert r.read(sha, BLOB, verify=False)[1] == data
    finally:
        r.close()


@pytest.mark.parametrize("claimed", [4096, 1 << 20])
def test_a_stream_inflating_past_its_declared_size_is_refused_holding_at_most_that(
    repo: Repository, claimed: int
) -> None:
    # A hostile pack: an object that says it holds `claimed` bytes whose
    # stream inflates to 64 MiB (deflate reaches ~1000x).  It is refused,
    # and the reader never holds more than the declared size of output.
    import tracemalloc

    bomb = zlib.compress(bytes(64 << 20), 9)
    w = PackWriter(repo)
    sha = blob_id(b"bomb %d" % claimed)
    w.add_compressed(BLOB, sha, claimed, bomb)
    w.finish()
    r = PackReader(repo)
    try:
        tracemalloc.start()
        with pytest.raises(CorruptRepository, match="wrong size"):
            r.read(sha, BLOB, verify=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < claimed + (4 << 20)
    finally:
        r.close()


def test_a_header_claiming_more_than_the_pack_holds_reads_no_more_than_the_pack(
    repo: Repository,
) -> None:
    # pread allocates what it is asked for: a header claiming 2^50 bytes must
    # not make the reader ask for them.
    data = b"small object"
    w = PackWriter(repo)
    sha = blob_id(data)
    w.add_compressed(BLOB, sha, 1 << 50, deflate(data))
    w.finish()
    _unchecked_read_fails(repo, sha)


def test_large_objects_are_read_as_long_as_their_stream_whatever_the_hint(
    repo: Repository,
) -> None:
    # A large object is read up to where the next one starts (by the pack's
    # index), not as long as its inflated size; a wrong hint costs reads only.
    from array import array

    from vml.plumbing.packindex import object_ends

    blobs = [os.urandom(500) * 400, os.urandom(300_000), b"x" * 200_000]
    w = PackWriter(repo)
    for data in blobs:
        w.add_compressed(BLOB, blob_id(data), len(data), deflate(data))
    name = w.finish()
    assert name is not None
    pack = repo.objects_dir / "pack" / f"{name}.pack"
    ends = object_ends(pack.with_suffix(".idx"), pack.stat().st_size)
    index = load_pack_index(str(pack.with_suffix(".idx")), DEFAULT_OBJECT_FORMAT)
    offsets = sorted(off for _sha, off, _crc in index.iterentries())
    assert list(ends) == [*offsets, pack.stat().st_size - 20]
    for hint in (None, [o + 3 for o in offsets], [offsets[0] + 1]):
        r = PackReader(repo)
        try:
            if hint is not None:
                (fd,) = r._idx_paths
                r._ends[fd] = array("Q", hint)
            for data in blobs:
                assert r.read(blob_id(data), BLOB, verify=False)[1] == data
        finally:
            r.close()


def test_an_index_that_cannot_be_read_gives_no_ends(tmp_path: Path) -> None:
    from vml.plumbing.packindex import object_ends

    bad = tmp_path / "pack-x.idx"
    bad.write_bytes(b"\377tOc" + bytes(20))
    assert len(object_ends(bad, 1000)) == 0
    assert len(object_ends(tmp_path / "missing.idx", 1000)) == 0


def _unchecked_read_fails(repo: Repository, sha: bytes) -> None:
    """Reading ``sha`` without its id check is refused as damage."""
    r = PackReader(repo)
    try:
        with pytest.raises(CorruptRepository):
            r.read(sha, BLOB, verify=False)
    finally:
        r.close()


@pytest.mark.parametrize("n", [0, 1, 4095, 5400, 70_000, 200_000])
def test_read_head_gives_the_first_bytes_of_every_kind_of_object(repo: Repository, n: int) -> None:
    # A restore's plan inflates only the start of each delta (its header):
    # compressible, stored, padded (a long stream), shorter than asked, loose.
    text = bytes(range(256)) * 400
    rnd = os.urandom(100_000)
    w = PackWriter(repo)
    ids = [w.add_blob(text), w.add_blob(rnd), w.add_blob(b"tiny")]
    padded = text[:3000]
    w.add_compressed(BLOB, blob_id(padded), len(padded), _padded_stream(padded))
    w.finish()
    loose = write_loose(repo, Blob.from_string(b"loose" * 100))
    r = PackReader(repo)
    try:
        for sha, data in [
            *zip(ids, [text, rnd, b"tiny"], strict=True),
            (blob_id(padded), padded),
            (loose, b"loose" * 100),
        ]:
            assert r.read_head(sha, n) == data[:n]
    finally:
        r.close()


def test_read_head_of_a_damaged_stream_is_refused_as_the_whole_read_is(repo: Repository) -> None:
    data = b"\x00\x01" * 20_000
    w = PackWriter(repo)
    sha = blob_id(data)
    w.add_compressed(BLOB, sha, len(data), deflate(data)[:10])  # cut short
    w.finish()
    r = PackReader(repo)
    try:
        with pytest.raises(CorruptRepository):
            r.read_head(sha, 5000)
    finally:
        r.close()
