"""Images: holes stay holes, small changes store small deltas, damage is caught."""

from __future__ import annotations

import dataclasses
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, allocated, edit
from tests.plumbing.entry_kit import build, save
from vml.errors import CorruptRepository
from vml.plumbing.building import punch_hole, write_image
from vml.plumbing.cache import block_hash
from vml.plumbing.chains import ResolvedImage, image_layer, resolve_image
from vml.plumbing.digests import block_digest
from vml.plumbing.images import file_digest
from vml.plumbing.manifests import (
    SPARSE_CHECK_SIZE,
    BlockChecks,
    read_block_map,
    zero_check,
)
from vml.plumbing.packreader import BLOB, PackReader, blob_id
from vml.plumbing.repository import Repository
from vml.plumbing.vm.formats import data_ranges

MiB = 1 << 20


def _sparse_area(a: Path) -> Path:
    """An area with an 8 MiB disk holding 100 KiB of data."""
    a.mkdir()
    (a / "vm.vmx").write_text('displayName = "sparse"\n')
    disk = a / "disk.img"
    rng = random.Random(5)
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(rng.randbytes(100 << 10))
    return disk


def test_data_ranges_and_punch_hole(tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"x" * (256 << 10))
    fd = os.open(p, os.O_RDWR)
    try:
        r = data_ranges(fd, 4 * MiB)
        assert len(r) == 1 and r[0][0] <= MiB and r[0][1] >= MiB + (256 << 10)
        punch_hole(fd, MiB, 256 << 10)
        assert data_ranges(fd, 4 * MiB) == []
        assert os.pread(fd, 10, MiB) == bytes(10)
    finally:
        os.close(fd)
    assert data_ranges(os.open(tmp_path, os.O_RDONLY), 0) == []


def test_holes_are_not_read_and_come_back_as_holes(repo: Repository, tmp_path: Path) -> None:
    disk = _sparse_area(tmp_path / "a")
    assert allocated(disk) < MiB
    res = save(repo, tmp_path / "a")
    assert res.read_bytes < 2 * MiB  # the 7.9 MiB of holes were never read
    assert res.stored_bytes < 200 << 10
    out = tmp_path / "out"
    build(repo, "E1", out)
    got = out / "disk.img"
    assert got.stat().st_size == 8 * MiB
    assert got.read_bytes() == disk.read_bytes()
    assert allocated(got) < MiB  # far less than 8 MiB
    fd = os.open(got, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) >= 2 * MiB  # the first 2 MiB are a hole
    finally:
        os.close(fd)


def test_written_zeros_cost_nothing_and_become_holes(repo: Repository, tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    disk = a / "disk.img"
    disk.write_bytes(bytes(4 * MiB) + b"\x01" * TEST_BLOCK)  # allocated zeros
    assert allocated(disk) >= 4 * MiB
    res = save(repo, a)
    assert res.stored_bytes < 16 << 10
    build(repo, "E1", tmp_path / "out")
    assert allocated(tmp_path / "out" / "disk.img") < MiB


def test_small_change_stores_a_small_delta(repo: Repository, area: Path) -> None:
    disk = area / "disk.img"
    save(repo, area)
    edit(disk, TEST_BLOCK + 8192, os.urandom(4096))  # block 1 holds data
    res = save(repo, area)
    assert res.stored_bytes < TEST_BLOCK // 4
    r = PackReader(repo)
    try:
        tree = r.read(bytes.fromhex(res.commit), 1)[1]
        root = bytes.fromhex(tree[5:45].decode())
        layer = image_layer(r, root, "disk.img")
        assert layer is not None
        manifest, blocks, _sources = layer
        assert blocks is not None and not manifest.base
        bmap = read_block_map(lambda s: r.read(s, 2)[1], blocks, manifest.nblocks)
        assert list(bmap) == [1]
        is_delta, sha = bmap[1]
        assert is_delta
        blob = r.read(sha, BLOB)[1]
        assert 4096 < len(blob) < 4096 + 256  # one page and a header, not 64 KiB
    finally:
        r.close()


def test_unchanged_image_is_not_read_again(repo: Repository, area: Path) -> None:
    save(repo, area)
    (area / "vm.vmx").write_text("changed\n")
    res = save(repo, area)
    assert res.read_bytes < 64 << 10  # only the small files
    assert res.changed_files == ["vm.vmx"]


def test_manifest_digest(repo: Repository, area: Path) -> None:
    res = save(repo, area)
    r = PackReader(repo)
    try:
        tree = bytes.fromhex(r.read(bytes.fromhex(res.commit), 1)[1][5:45].decode())
        layer = image_layer(r, tree, "disk.img")
        assert layer is not None
        assert layer[0].sha256 == file_digest(area / "disk.img", TEST_BLOCK)
        assert layer[0].size == (area / "disk.img").stat().st_size
    finally:
        r.close()
    assert block_digest(None, 10) == block_digest(bytes(10), 10)


def test_damaged_block_is_refused_on_checkout(repo: Repository, area: Path, tmp_path: Path) -> None:
    edit(area / "disk.img", 0, os.urandom(TEST_BLOCK))  # incompressible block 0
    save(repo, area)
    for pack in (repo.objects_dir / "pack").glob("*.pack"):
        raw = bytearray(pack.read_bytes())
        i = raw.find(b"x\x01")  # a stored (level 0) zlib stream holds raw bytes
        if i < 0:
            continue
        raw[i + 2000] ^= 0x55
        os.chmod(pack, 0o644)
        pack.write_bytes(bytes(raw))
    out = tmp_path / "out"
    with pytest.raises(CorruptRepository):
        build(repo, "E1", out)
    assert not (out / "disk.img").exists()  # no half-built file left as the real one


def _image(r: PackReader, commit_hex: str) -> ResolvedImage:
    img = resolve_image(r, bytes.fromhex(commit_hex), "disk.img")
    assert img is not None
    return img


def _file_checks(path: Path) -> list[tuple[bytes, bytes]]:
    data = path.read_bytes()
    blocks = [data[i : i + TEST_BLOCK] for i in range(0, len(data), TEST_BLOCK)]
    return [(blob_id(b), block_hash(b)) for b in blocks]


def test_every_entry_records_its_block_checks(repo: Repository, area: Path) -> None:
    disk = area / "disk.img"
    first = save(repo, area)  # a base layer
    want = [_file_checks(disk)]
    edit(disk, TEST_BLOCK + 8192, os.urandom(4096))
    second = save(repo, area)  # a page delta
    want.append(_file_checks(disk))
    (area / "vm.vmx").write_text("changed\n")
    third = save(repo, area)  # the image unchanged: no block stored
    want.append(want[-1])
    zero = zero_check(TEST_BLOCK)
    r = PackReader(repo)
    try:
        for res, checks in zip((first, second, third), want, strict=True):
            img = _image(r, res.commit)
            assert img.checks is not None and img.checks.sparse
            assert [img.check(n) for n in range(img.manifest.nblocks)] == checks
            # Only the blocks holding data are listed, 40 bytes each.
            listed = [n for n, c in enumerate(checks) if c != zero]
            assert list(img.checks.numbers) == listed
            assert len(img.checks.data) == len(listed) * SPARSE_CHECK_SIZE
    finally:
        r.close()


def test_dense_checks_of_older_entries_are_read(repo: Repository, area: Path) -> None:
    """Entries saved before sparse checks hold ``checks``: every block, 36 bytes each."""
    res = save(repo, area)
    dense = b"".join(a + b for a, b in _file_checks(area / "disk.img"))
    r = PackReader(repo)
    try:
        img = _image(r, res.commit)
        old = BlockChecks(img.manifest, dense, sparse=False)
        assert old.name == b"checks"
        assert [old.get(n) for n in range(img.manifest.nblocks)] == [
            img.check(n) for n in range(img.manifest.nblocks)
        ]
        with pytest.raises(CorruptRepository):
            BlockChecks(img.manifest, dense[:-1], sparse=False)
        with pytest.raises(CorruptRepository):  # out of order
            BlockChecks(img.manifest, img.checks.data[40:80] + img.checks.data[:40], sparse=True)
    finally:
        r.close()


@pytest.mark.parametrize("with_checks", [True, False], ids=["checks", "object-ids"])
def test_restore_checks_blocks_with_or_without_entry_checks(
    repo: Repository, area: Path, tmp_path: Path, with_checks: bool
) -> None:
    """Entries saved before checks existed are still built and checked (by object id)."""
    disk = area / "disk.img"
    edit(disk, 0, os.urandom(TEST_BLOCK))  # incompressible block 0: stored raw
    res = save(repo, area)
    r = PackReader(repo)
    pool = ThreadPoolExecutor(2)
    try:
        img = _image(r, res.commit)
        if not with_checks:
            img = dataclasses.replace(img, checks=None)
        out = tmp_path / "out.img"
        with open(out, "wb") as f:
            write_image(r, pool, img, f.fileno(), None, lambda n: None)
        assert out.read_bytes() == disk.read_bytes()
        # Damage block 0's raw bytes inside its stored zlib stream.
        for pack in (repo.objects_dir / "pack").glob("*.pack"):
            raw = bytearray(pack.read_bytes())
            i = raw.find(b"x\x01")
            if i >= 0:
                raw[i + 2000] ^= 0x55
                os.chmod(pack, 0o644)
                pack.write_bytes(bytes(raw))
        r.refresh()
        with open(tmp_path / "again.img", "wb") as f, pytest.raises(CorruptRepository):
            write_image(r, pool, img, f.fileno(), None, lambda n: None)
    finally:
        pool.shutdown()
        r.close()


def test_pages_that_become_zero_cost_no_bytes(repo: Repository, area: Path, tmp_path: Path) -> None:
    disk = area / "disk.img"
    edit(disk, TEST_BLOCK, os.urandom(TEST_BLOCK))  # block 1 full of data
    save(repo, area)
    edit(disk, TEST_BLOCK + 3 * 4096, bytes(4 * 4096))  # four of its pages zeroed
    res = save(repo, area)
    r = PackReader(repo)
    try:
        tree = r.read(bytes.fromhex(res.commit), 1)[1]
        layer = image_layer(r, bytes.fromhex(tree[5:45].decode()), "disk.img")
        assert layer is not None and layer[1] is not None
        bmap = read_block_map(lambda s: r.read(s, 2)[1], layer[1], layer[0].nblocks)
        is_delta, sha = bmap[1]
        assert is_delta
        assert len(r.read(sha, BLOB)[1]) < 64  # a header and four page numbers
    finally:
        r.close()
    build(repo, res.entry, tmp_path / "out")
    assert (tmp_path / "out" / "disk.img").read_bytes() == disk.read_bytes()
