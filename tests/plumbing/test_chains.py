"""Chain resolution: one recipe per block, resolved from metadata before any data is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, edit, make_area
from tests.plumbing.entry_kit import save
from vml.errors import HostileRepository
from vml.plumbing.chains import MAX_DELTA_DEPTH, ZERO, materialize, resolve_image
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository


def _cid(res: object) -> bytes:
    return bytes.fromhex(res.commit)  # type: ignore[attr-defined]


def _blocks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + TEST_BLOCK] for i in range(0, len(data), TEST_BLOCK)]


def test_recipes_follow_the_chain(repo: Repository, area: Path) -> None:
    e1 = save(repo, area)
    disk = area / "disk.img"
    edit(disk, 3 * TEST_BLOCK + 4096, b"\x07" * 4096)  # one page of block 3
    edit(disk, 0, bytes(TEST_BLOCK))  # block 0 becomes zero
    e2 = save(repo, area)
    edit(disk, 3 * TEST_BLOCK + 8192, b"\x08" * 4096)
    e3 = save(repo, area)
    r = PackReader(repo)
    try:
        img1 = resolve_image(r, _cid(e1), "disk.img")
        img3 = resolve_image(r, _cid(e3), "disk.img")
        assert img1 is not None and img3 is not None
        assert img3.manifest.size == disk.stat().st_size
        assert img3.recipes[0] == ZERO
        # block 3: E1's whole block plus the deltas of E2 and E3, oldest first
        assert img3.recipes[3].base == img1.recipes[3].base
        assert len(img3.recipes[3].deltas) == 2
        # untouched blocks resolve to E1's blobs, with no deltas
        assert img3.recipes[1] == img1.recipes[1]
        assert img1.recipes[8] == ZERO  # a hole in E1 (1 MiB disk, data up to ~750 KB)
        for n, want in enumerate(_blocks(disk)):
            got = materialize(r, img3.recipes[n], len(want))
            assert (got if got is not None else bytes(len(want))) == want
        assert resolve_image(r, _cid(e3), "vm.vmx") is None  # a small file, not an image
        assert resolve_image(r, _cid(e2), "nope.img") is None
    finally:
        r.close()


def test_differential_resolves_against_the_base(repo: Repository, area: Path) -> None:
    e1 = save(repo, area)
    disk = area / "disk.img"
    for i in range(3):
        edit(disk, 5 * TEST_BLOCK + i * 4096, b"\x01" * 4096)
        save(repo, area)
    e5 = save(repo, area, base=bytes.fromhex(e1.commit), allow_empty=True)
    assert e5.parent == e1.entry
    r = PackReader(repo)
    try:
        img = resolve_image(r, _cid(e5), "disk.img")
        assert img is not None
        assert len(img.recipes[5].deltas) <= 1  # one layer above the full entry
        got = materialize(r, img.recipes[5], TEST_BLOCK)
        assert got == _blocks(disk)[5]
    finally:
        r.close()


def test_delta_depth_is_bounded(repo: Repository, tmp_path: Path) -> None:
    area = tmp_path / "a"
    make_area(area, disk=4 * TEST_BLOCK)
    disk = area / "disk.img"
    edit(disk, 0, b"\x11" * TEST_BLOCK)
    last = save(repo, area)
    for i in range(MAX_DELTA_DEPTH + 3):
        edit(disk, 4096 * (i % 16), bytes([i + 1]) * 4096)
        last = save(repo, area)
    r = PackReader(repo)
    try:
        img = resolve_image(r, _cid(last), "disk.img")
        assert img is not None
        assert len(img.recipes[0].deltas) <= MAX_DELTA_DEPTH
        assert materialize(r, img.recipes[0], TEST_BLOCK) == _blocks(disk)[0]
    finally:
        r.close()


def test_growing_and_shrinking(repo: Repository, area: Path) -> None:
    disk = area / "disk.img"
    save(repo, area)
    with open(disk, "ab") as f:
        f.write(b"\x05" * (TEST_BLOCK + 100))
    e2 = save(repo, area)
    disk.write_bytes(disk.read_bytes()[: 2 * TEST_BLOCK + 10])
    e3 = save(repo, area)
    r = PackReader(repo)
    try:
        for e, n in ((e2, 18), (e3, 3)):
            img = resolve_image(r, _cid(e), "disk.img")
            assert img is not None and img.manifest.nblocks == n
        img = resolve_image(r, _cid(e3), "disk.img")
        assert img is not None
        want = disk.read_bytes()[2 * TEST_BLOCK :]
        got = materialize(r, img.recipes[2], 10)
        assert (got if got is not None else bytes(10)) == want
    finally:
        r.close()


def test_a_block_needing_more_deltas_than_a_reader_takes_is_refused(
    repo: Repository, area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vml.plumbing.chains as chains

    save(repo, area)
    disk = area / "disk.img"
    for i in range(3):
        edit(disk, 4096 * i, bytes([i + 1]) * 4096)  # one page of block 0 each time
        last = save(repo, area)
    monkeypatch.setattr(chains, "MAX_RECIPE_DELTAS", 2)
    r = PackReader(repo)
    try:
        with pytest.raises(HostileRepository, match="page deltas"):
            resolve_image(r, bytes.fromhex(last.commit), "disk.img")
    finally:
        r.close()
