"""Page references (version-3 deltas, #12): a memory file's pages that its disk holds.

A guest's memory holds its disk's blocks (the page cache).  A save stores
such pages of the memory file as references to the blobs that hold them;
these tests check that the entries stay exact and self-contained through
every command that reads, moves or collects objects: checkout, verify,
fsck, git fsck, rm/convert (the references stay reachable from the
rewritten layers), gc, and a clone.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from dulwich.objects import Commit, Tree
from dulwich.repo import Repo

from tests.conftest import digest_area
from tests.reliability.helpers import vml_in_process as vml
from vml.plumbing import pageindex

PAGE = 4096
BLOCK = 64 << 10  # cli_repo's block size
DISK = 32 * BLOCK
RAM = 16 * BLOCK


def _page(rng: random.Random) -> bytes:
    return rng.randbytes(PAGE)


def _session(area: Path, rng: random.Random) -> None:
    """The guest writes some disk pages and caches disk pages (new and old) in its memory."""
    disk = bytearray((area / "disk.img").read_bytes())
    ram = bytearray((area / "vm.ram").read_bytes())
    npages = DISK // PAGE
    for _ in range(40):  # new data on the disk, in runs (files written)
        p = rng.randrange(npages - 8)
        for k in range(p, p + rng.randrange(1, 8)):
            disk[k * PAGE : (k + 1) * PAGE] = _page(rng)
    for _ in range(20):  # the page cache: memory pages that hold disk pages (files read)
        run = rng.randrange(4, 9)
        src = rng.randrange(npages - run)
        dst = rng.randrange(RAM // PAGE - run)
        ram[dst * PAGE : (dst + run) * PAGE] = disk[src * PAGE : (src + run) * PAGE]
    for _ in range(10):  # and memory of its own
        dst = rng.randrange(RAM // PAGE)
        ram[dst * PAGE : (dst + 1) * PAGE] = _page(rng)
    (area / "disk.img").write_bytes(disk)
    (area / "vm.ram").write_bytes(ram)


def _area(tmp_path: Path, seed: int = 7) -> tuple[Path, random.Random]:
    rng = random.Random(seed)
    area = tmp_path / "vm"
    area.mkdir()
    (area / "disk.img").write_bytes(rng.randbytes(DISK))
    (area / "vm.ram").write_bytes(bytes(RAM))
    (area / "vm.conf").write_text("memory = 1M\n")
    return area, rng


def _stored(repo: Path, entry: str) -> int:
    return int(json.loads(vml(repo, "show", "--json", entry).out)["stored_bytes"])


def _ram_layer(repo: Path, entry: str) -> tuple[dict[str, object], list[bytes]]:
    """The memory file's manifest in ``entry`` and the blobs its ``sources`` tree names."""
    git = Repo(str(repo))
    try:
        ref = f"refs/vml/entries/{entry[1:]}".encode()
        commit = git[git.refs[ref]]
        assert isinstance(commit, Commit)
        tree = git[commit.tree]
        assert isinstance(tree, Tree)
        images = git[tree[b"images"][1]]
        assert isinstance(images, Tree)
        img = git[images[b"vm.ram"][1]]
        assert isinstance(img, Tree)
        manifest = json.loads(git[img[b"manifest"][1]].as_raw_string())
        sources: list[bytes] = []
        if b"sources" in img:
            src = git[img[b"sources"][1]]
            assert isinstance(src, Tree)
            sources = [bytes.fromhex(sha.decode()) for _name, _mode, sha in src.iteritems()]
        return manifest, sources
    finally:
        git.close()


def _saved(
    tmp_path: Path, repo: Path, sessions: int = 2
) -> tuple[Path, list[dict[str, tuple[object, ...]]]]:
    area, rng = _area(tmp_path)
    states = []
    for _ in range(sessions + 1):
        assert vml(repo, "commit", "-q", area).code == 0
        states.append(digest_area(area))
        _session(area, rng)
    return area, states


def _git_fsck(repo: Path) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "fsck", "--full", "--strict"], check=True, capture_output=True
    )


def test_memory_pages_the_disk_holds_are_stored_as_references(
    tmp_path: Path, cli_repo: Path
) -> None:
    _, states = _saved(tmp_path, cli_repo)
    manifest, sources = _ram_layer(cli_repo, "E2")
    assert manifest["vml_manifest"] == 2 and sources, "E2's memory layer references the disk"
    # ~120 cached pages and 10 of its own: far less than storing them.
    assert _stored(cli_repo, "E2") < 60 * PAGE + 40 * 8 * PAGE
    for n, want in enumerate(states, 1):
        out = tmp_path / f"out{n}"
        assert vml(cli_repo, "checkout", "-q", f"E{n}", out).code == 0
        assert digest_area(out) == want
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    assert vml(cli_repo, "fsck", "-q").code == 0
    _git_fsck(cli_repo)


def test_references_survive_rm_convert_gc_and_a_clone(tmp_path: Path, cli_repo: Path) -> None:
    """The layers rm and convert rewrite name the referenced blobs, so gc and git keep them."""
    _, states = _saved(tmp_path, cli_repo, sessions=3)
    assert vml(cli_repo, "rm", "--force", "E2").code == 0  # E3 moves onto E1
    # E3's memory layer now also names what E2's deltas, inherited, reference.
    assert _ram_layer(cli_repo, "E3")[1]
    assert vml(cli_repo, "convert", "E4", "--to", "full").code == 0
    assert vml(cli_repo, "gc", "-q").code == 0
    _git_fsck(cli_repo)
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    for n in (1, 3, 4):
        out = tmp_path / f"out{n}"
        assert vml(cli_repo, "checkout", "-q", f"E{n}", out).code == 0
        assert digest_area(out) == states[n - 1]
    copy = tmp_path / "copy"
    assert vml(copy, "clone", "-q", cli_repo, copy).code == 0
    _git_fsck(copy)
    assert vml(copy, "verify", "--all", "--read-data", "-q").code == 0


def test_pages_cached_in_runs_are_confirmed_a_run_a_read(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest caches disk pages in runs (4-8 here): confirming them byte for byte
    reads each run of adjacent candidates once, not each page."""
    counts = [0, 0]  # reads, pages
    real = pageindex.PageIndex._pread_runs

    def counting(
        self: pageindex.PageIndex, path: Path, offsets: list[int]
    ) -> list[tuple[int, bytes, int, int]]:
        runs = real(self, path, offsets)
        counts[0] += len(runs)
        counts[1] += len(offsets)
        return runs

    monkeypatch.setattr(pageindex.PageIndex, "_pread_runs", counting)
    _, states = _saved(tmp_path, cli_repo)
    reads, pages = counts
    assert pages > 100
    assert reads * 3 < pages, f"{reads} reads for {pages} candidate pages"
    for n, want in enumerate(states, 1):
        out = tmp_path / f"out{n}"
        assert vml(cli_repo, "checkout", "-q", f"E{n}", out).code == 0
        assert digest_area(out) == want


def test_a_hash_collision_never_makes_a_wrong_page(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages look like candidates for many others (a guest crafting xxh3 collisions: only
    7 bits of each hash compared, a few candidates a page, most of them wrong): the bytes
    decide, and every entry still checks out exactly.  (Every page colliding with every
    other: test_page_refs_review, which bounds the reads a page costs.)"""
    monkeypatch.setattr(pageindex, "_MASK", 0x7F << 57)
    wrong = 0
    real = pageindex.PageIndex._confirm_many

    def counting(
        self: pageindex.PageIndex,
        ix: pageindex._Indexed,
        items: list[tuple[int, int]],
        data: bytes,
    ) -> list[object]:
        nonlocal wrong
        found = real(self, ix, items, data)
        wrong += sum(where is None for where in found)
        return list(found)

    monkeypatch.setattr(pageindex.PageIndex, "_confirm_many", counting)
    _, states = _saved(tmp_path, cli_repo)
    assert wrong > 100  # candidates whose bytes differ were tried, and refused
    _manifest, sources = _ram_layer(cli_repo, "E2")
    assert sources  # real matches are still found
    for n, want in enumerate(states, 1):
        out = tmp_path / f"out{n}"
        assert vml(cli_repo, "checkout", "-q", f"E{n}", out).code == 0
        assert digest_area(out) == want
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0


def test_a_sampled_index_still_makes_exact_entries(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its bound the index keeps a content-defined sample of the pages (and counts
    what it kept for the next image's rate): what it finds is still exact."""
    monkeypatch.setattr(pageindex, "MAX_PAGES", 64)
    rates: list[int] = []
    build = pageindex.PageIndex._build

    def recording(self: pageindex.PageIndex, ix: pageindex._Indexed) -> int:
        rates.append(ix.rate)
        return build(self, ix)

    monkeypatch.setattr(pageindex.PageIndex, "_build", recording)
    _, states = _saved(tmp_path, cli_repo)
    assert rates and max(rates) > 1  # the sample was taken
    for n, want in enumerate(states, 1):
        out = tmp_path / f"out{n}"
        assert vml(cli_repo, "checkout", "-q", f"E{n}", out).code == 0
        assert digest_area(out) == want
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0


def test_a_disk_changed_after_it_was_saved_fails_the_save(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """References name the disk's bytes as saved: a disk changed before the entry is
    published makes the save fail, with nothing published."""
    area, rng = _area(tmp_path)
    assert vml(cli_repo, "commit", "-q", area).code == 0
    _session(area, rng)
    real = pageindex.PageIndex.check

    def touch_then_check(self: pageindex.PageIndex) -> None:
        with open(area / "disk.img", "r+b") as f:
            f.write(b"changed")
        real(self)

    monkeypatch.setattr(pageindex.PageIndex, "check", touch_then_check)
    run = vml(cli_repo, "commit", "-q", area)
    assert run.code == 6, run
    assert "changed" in run.err
    assert not (cli_repo / "refs" / "vml" / "entries" / "2").exists()


def test_entries_without_references_stay_readable_by_older_vml(
    tmp_path: Path, cli_repo: Path
) -> None:
    """Only a layer that has references says ``vml_manifest: 2`` (older VML refuses it as newer)."""
    area, rng = _area(tmp_path)
    (area / "vm.ram").unlink()
    for _ in range(2):
        assert vml(cli_repo, "commit", "-q", area).code == 0
        _session_disk_only(area, rng)
    git = Repo(str(cli_repo))
    try:
        versions = set()
        for sha in git.object_store:
            obj = git[sha]
            raw = obj.as_raw_string()
            if obj.type_name == b"blob" and raw.startswith(b'{"base"'):
                versions.add(json.loads(raw)["vml_manifest"])
        assert versions == {1}
    finally:
        git.close()


def _session_disk_only(area: Path, rng: random.Random) -> None:
    disk = bytearray((area / "disk.img").read_bytes())
    for k in rng.sample(range(DISK // PAGE), 20):
        disk[k * PAGE : (k + 1) * PAGE] = disk[((k + 7) % (DISK // PAGE)) * PAGE :][:PAGE]
    (area / "disk.img").write_bytes(disk)


def _images_id(git: Repo, entry: str) -> bytes:
    """The id of ``entry``'s images tree."""
    commit = git[git.refs[f"refs/vml/entries/{entry[1:]}".encode()]]
    assert isinstance(commit, Commit)
    tree = git[commit.tree]
    assert isinstance(tree, Tree)
    return tree[b"images"][1]


def _anchored_leaves(repo: Path, entry: str, image: str) -> int:
    """How many blocks of ``image``'s layer in ``entry`` are anchored (``<c>.r/`` trees)."""
    git = Repo(str(repo))
    try:
        images = git[_images_id(git, entry)]
        assert isinstance(images, Tree)
        img = git[images[image.encode()][1]]
        assert isinstance(img, Tree)
        if b"blocks" not in img:
            return 0
        count = 0
        todo = [img[b"blocks"][1]]
        while todo:
            t = git[todo.pop()]
            assert isinstance(t, Tree)
            for name, mode, sha in t.iteritems():
                if name.endswith(b".r"):
                    count += 1
                elif mode == 0o040000:
                    todo.append(sha)
        return count
    finally:
        git.close()


def test_a_disk_that_copies_its_own_data_references_it(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file copied within the disk, and to where the disk grew (a qcow2 file allocates new
    clusters at its end): pages of the disk's previous version, referenced, not stored again
    (when the index offers them: off by default, see pageindex.INDEX_PARENT_VERSION)."""
    monkeypatch.setattr(pageindex, "INDEX_PARENT_VERSION", True)
    area, _ = _area(tmp_path)
    (area / "vm.ram").unlink()
    assert vml(cli_repo, "commit", "-q", area).code == 0
    states = [digest_area(area)]
    disk = (area / "disk.img").read_bytes()
    copied = disk[3 * BLOCK : 7 * BLOCK]
    grown = bytearray(disk)
    grown[20 * BLOCK + PAGE : 22 * BLOCK + PAGE] = copied[: 2 * BLOCK]  # in place, page-aligned
    grown += copied  # the file grows by a copy of 4 blocks
    (area / "disk.img").write_bytes(grown)
    assert vml(cli_repo, "commit", "-q", area).code == 0
    states.append(digest_area(area))
    assert _stored(cli_repo, "E2") < BLOCK  # 6 blocks of copies: references, not bytes
    assert _anchored_leaves(cli_repo, "E2", "disk.img") >= 4  # the grown blocks
    for n, want in enumerate(states, 1):
        out = tmp_path / f"out{n}"
        assert vml(cli_repo, "checkout", "-q", f"E{n}", out).code == 0
        assert digest_area(out) == want
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    _git_fsck(cli_repo)
    # rm and convert carry anchored blocks and their sources like any other.
    assert vml(cli_repo, "convert", "E2", "--to", "full").code == 0
    assert vml(cli_repo, "rm", "--force", "E1").code == 0  # an area holds it
    assert vml(cli_repo, "gc", "-q").code == 0
    out = tmp_path / "after"
    assert vml(cli_repo, "checkout", "-q", "E2", out).code == 0
    assert digest_area(out) == states[1]
    _git_fsck(cli_repo)


def _images_tree(repo: Path, entry: str) -> bytes:
    git = Repo(str(repo))
    try:
        return _images_id(git, entry)
    finally:
        git.close()


def test_a_block_is_looked_up_once_for_a_delta_and_a_self_contained_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory block mostly new but for a few cached disk pages is no delta worth
    storing, and is then tried as a self-contained block: the pages looked up for the
    delta are not looked up again, and the entry is the one looking every page up
    again makes (the same images tree)."""
    asked: dict[tuple[int, int], int] = {}
    blocks: list[bytes] = []  # kept alive: their ids name them while the save runs
    reused = 0
    real_look_up = pageindex.PageIndex._look_up
    real_find = pageindex.PageIndex.find

    def look_up(
        self: pageindex.PageIndex, data: bytes, pages: list[int], hs: object
    ) -> dict[int, object]:
        blocks.append(data)
        for k in pages:
            asked[id(data), k] = asked.get((id(data), k), 0) + 1
        return dict(real_look_up(self, data, pages, hs))  # type: ignore[arg-type]

    def find(
        self: pageindex.PageIndex,
        data: bytes,
        pages: list[int],
        hashes: bytes,
        known: pageindex.Looked | None = None,
    ) -> dict[int, object]:
        nonlocal reused
        if known is not None and known.pages:
            reused += 1
        return dict(real_find(self, data, pages, hashes, known))

    def forgetful(
        self: pageindex.PageIndex,
        data: bytes,
        pages: list[int],
        hashes: bytes,
        known: pageindex.Looked | None = None,
    ) -> dict[int, object]:
        return dict(real_find(self, data, pages, hashes))

    trees = []
    for run, spy in enumerate((find, forgetful)):
        repo = tmp_path / f"repo{run}"
        assert vml(repo, "init", "--block-size", "64K", repo).code == 0
        (tmp_path / f"run{run}").mkdir()
        area, rng = _area(tmp_path / f"run{run}")
        assert vml(repo, "commit", "-q", area).code == 0
        disk = (area / "disk.img").read_bytes()
        ram = bytearray((area / "vm.ram").read_bytes())
        # Block 3: 12 pages of its own, 4 the disk holds.
        ram[3 * BLOCK : 4 * BLOCK] = rng.randbytes(BLOCK)
        ram[3 * BLOCK : 3 * BLOCK + 4 * PAGE] = disk[5 * PAGE : 9 * PAGE]
        (area / "vm.ram").write_bytes(ram)
        with monkeypatch.context() as m:
            m.setattr(pageindex.PageIndex, "_look_up", look_up)
            m.setattr(pageindex.PageIndex, "find", spy)
            asked.clear()
            assert vml(repo, "commit", "-q", area).code == 0
        if spy is find:
            assert reused, "the self-contained try reused the delta's look-ups"
            assert asked and max(asked.values()) == 1
        else:
            assert max(asked.values()) == 2  # looked up for the delta, then again
        trees.append(_images_tree(repo, "E2"))
        blocks.clear()
    assert trees[0] == trees[1]
