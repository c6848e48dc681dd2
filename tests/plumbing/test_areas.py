"""Areas: state file, lock, scan, and a cache that really describes the files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, edit
from tests.plumbing.entry_kit import save
from vml.errors import AreaError, RepositoryBusy
from vml.plumbing.areas import (
    AreaLocks,
    AreaState,
    load_state,
    lock_area,
    save_state,
    scan_area,
    stat_signature,
    vml_dir,
)
from vml.plumbing.cache import Cache, CachedFile, CacheWriter, block_hash, drop_cache, page_hashes
from vml.plumbing.digests import block_digest
from vml.plumbing.repository import Repository


def test_state_round_trip(tmp_path: Path) -> None:
    assert load_state(tmp_path) is None
    st = AreaState(repository="/r", entry="ab" * 20, branch="main")
    save_state(tmp_path, st)
    assert load_state(tmp_path) == st
    # unknown keys from a newer vml are ignored, missing ones defaulted
    (vml_dir(tmp_path) / "area.json").write_text('{"entry": "%s", "future": 1}' % ("cd" * 20))
    got = load_state(tmp_path)
    assert got is not None and got.entry == "cd" * 20 and got.branch is None
    (vml_dir(tmp_path) / "area.json").write_text("{broken")
    with pytest.raises(AreaError, match="unreadable"):
        load_state(tmp_path)


def test_area_lock(tmp_path: Path) -> None:
    with lock_area(tmp_path), pytest.raises(RepositoryBusy), lock_area(tmp_path):
        pass
    # a folder VML never used keeps no .vml folder behind
    assert not vml_dir(tmp_path).exists()
    save_state(tmp_path, AreaState())
    with lock_area(tmp_path):
        pass
    assert (vml_dir(tmp_path) / "area.json").exists()


def test_area_locks_hold_across_steps(tmp_path: Path) -> None:
    """One command's AreaLocks takes an area once; others are refused until it closes."""
    save_state(tmp_path, AreaState())
    with AreaLocks() as locks:
        locks.take(tmp_path)
        locks.take(tmp_path / ".")  # held already: no second flock (which would refuse)
        with pytest.raises(RepositoryBusy), lock_area(tmp_path):
            pass
    with lock_area(tmp_path):  # released
        pass


def test_scan(tmp_path: Path) -> None:
    a = tmp_path / "a"
    (a / "sub" / "deep").mkdir(parents=True)
    (a / "empty").mkdir()
    (a / ".vml").mkdir()
    (a / ".vml" / "x").write_text("never listed")
    (a / "z.img").write_bytes(b"1")
    (a / "sub" / "deep" / "f").write_bytes(b"2")
    (a / "vmware.log").write_text("ignored by default")
    scan = scan_area(a, lambda rel, is_dir: rel.endswith(".log"))
    assert [f.path for f in scan.files] == ["sub/deep/f", "z.img"]
    assert scan.empty_dirs == ["empty"]
    assert [f.path for f in scan.folders] == ["empty", "sub", "sub/deep"]
    os.symlink("z.img", a / "link")
    with pytest.raises(AreaError, match="symbolic link"):
        scan_area(a, lambda rel, is_dir: False)
    (a / "link").unlink()
    os.mkfifo(a / "fifo")
    with pytest.raises(AreaError, match="not a regular file"):
        scan_area(a, lambda rel, is_dir: False)


def test_hashes() -> None:
    data = os.urandom(3 * 4096 + 100)
    ph = page_hashes(data, 4096, 16)
    assert len(ph) == 8 * 16
    assert ph[8 * 4 :] == bytes(8 * 12)  # padding after the 4 (short last) pages
    assert ph[:8] == page_hashes(data[:4096], 4096, 1)
    assert block_hash(data) != block_hash(data[:-1])
    assert len(block_hash(data)) == 16


def test_cache_describes_the_committed_files(repo: Repository, area: Path) -> None:
    res = save(repo, area)
    cache = Cache(area, repo.page_size, repo.block_size)
    assert cache.valid_for(res.commit) and not cache.valid_for("00" * 20)
    assert not cache.valid_for(None)
    disk = area / "disk.img"
    cf = cache.files["disk.img"]
    assert cf.kind == "image" and cf.stat == stat_signature(disk.stat())
    assert cache.files["vm.vmx"].kind == "small"
    recs = cache.records("disk.img")
    assert recs is not None
    try:
        data = disk.read_bytes()
        blocks = [data[i : i + TEST_BLOCK] for i in range(0, len(data), TEST_BLOCK)]
        assert recs.count == len(blocks)
        for n, b in enumerate(blocks):
            zero = b == bytes(len(b))
            assert recs.block_digest(n) == block_digest(None if zero else b, len(b))
            assert recs.block_hash(n) == block_hash(b)
            assert recs.page_hashes(n) == page_hashes(b, 4096, TEST_BLOCK // 4096)
        assert recs.block_digest(len(blocks)) is None
        # every data block's page hashes at once, as the page index reads them
        bulk = recs.all_page_hashes()
        want = b"".join(recs.page_hashes(n) for n in recs.data_blocks())
        assert len(bulk) * 8 == len(want) and bulk.tolist() == [
            int.from_bytes(want[i : i + 8], "big") for i in range(0, len(want), 8)
        ]
    finally:
        recs.close()
    # after an edit and a save, the new cache follows the new bytes
    edit(disk, 5000, b"\xff" * 10)
    res2 = save(repo, area)
    cache2 = Cache(area, repo.page_size, repo.block_size)
    assert cache2.valid_for(res2.commit)
    recs2 = cache2.records("disk.img")
    assert recs2 is not None
    try:
        assert recs2.block_hash(0) == block_hash(disk.read_bytes()[:TEST_BLOCK])
    finally:
        recs2.close()
    drop_cache(area)
    assert not Cache(area, repo.page_size, repo.block_size).valid_for(res2.commit)


def test_cache_of_another_geometry_is_ignored(repo: Repository, area: Path) -> None:
    res = save(repo, area)
    assert not Cache(area, repo.page_size, repo.block_size * 2).valid_for(res.commit)


def test_cache_writer_swap_and_abort(tmp_path: Path) -> None:
    w = CacheWriter(tmp_path, 4096, TEST_BLOCK)
    w.add("f", CachedFile("small", 1, "ab" * 32, [1, 2, 3, 4]))
    w.commit("cd" * 20)
    c = Cache(tmp_path, 4096, TEST_BLOCK)
    assert c.valid_for("cd" * 20) and set(c.files) == {"f"}
    w2 = CacheWriter(tmp_path, 4096, TEST_BLOCK)
    w2.add("g", CachedFile("small", 1, "ab" * 32, [1, 2, 3, 4]))
    w2.abort()
    c = Cache(tmp_path, 4096, TEST_BLOCK)
    assert c.valid_for("cd" * 20) and set(c.files) == {"f"}
    assert not (vml_dir(tmp_path) / "cache.tmp").exists()


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 16 * 4096])
def test_page_hashes_are_each_pages_xxh3_padded_to_a_record(length: int) -> None:
    import xxhash

    data = os.urandom(length)
    want = b"".join(xxhash.xxh3_64_digest(data[i : i + 4096]) for i in range(0, length, 4096))
    assert page_hashes(data, 4096, 16) == want + bytes(8 * 16 - len(want))
    assert page_hashes(memoryview(data), 4096, 16) == page_hashes(data, 4096, 16)
