"""Review of page references (#12): data loss and hostile input (reviewer's tests).

Each test names the invariant it checks; see the review report for causes.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from dulwich.objects import Commit, Tree
from dulwich.repo import Repo

from tests.conftest import digest_area
from tests.reliability.helpers import vml_in_process as vml
from tests.reliability.test_page_references import (
    BLOCK,
    DISK,
    PAGE,
    RAM,
    _area,
    _git_fsck,
    _ram_layer,
    _session,
)
from vml.plumbing import pageindex


def _sessions(tmp_path: Path, repo: Path, n: int, seed: int = 7) -> tuple[Path, list[object]]:
    area, rng = _area(tmp_path, seed)
    states: list[object] = []
    for _ in range(n):
        assert vml(repo, "commit", "-q", area).code == 0
        states.append(digest_area(area))
        _session(area, rng)
    return area, states


def _check_out(tmp_path: Path, repo: Path, wants: dict[int, object]) -> None:
    for n, want in wants.items():
        out = tmp_path / f"out{n}-{random.random()}"
        run = vml(repo, "checkout", "-q", f"E{n}", out)
        assert run.code == 0, run
        assert digest_area(out) == want, f"E{n} came back different"


def test_rm_of_the_root_and_a_middle_entry_keeps_every_reference(
    tmp_path: Path, cli_repo: Path
) -> None:
    """rm of the base (E2 becomes a base layer: its deltas become anchored blocks) and of
    a middle entry, then gc: every remaining entry checks out, git fsck passes."""
    _, states = _sessions(tmp_path, cli_repo, 5)
    assert _ram_layer(cli_repo, "E2")[1]
    assert vml(cli_repo, "rm", "--force", "E1").code == 0
    assert vml(cli_repo, "rm", "--force", "E3").code == 0
    assert vml(cli_repo, "gc", "-q").code == 0
    _git_fsck(cli_repo)
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    _check_out(tmp_path, cli_repo, {2: states[1], 4: states[3], 5: states[4]})


def test_prune_then_gc_keeps_every_reference(tmp_path: Path, cli_repo: Path) -> None:
    _, states = _sessions(tmp_path, cli_repo, 5)
    assert vml(cli_repo, "prune", "--keep-last", "2", "-q").code == 0
    assert vml(cli_repo, "gc", "-q").code == 0
    _git_fsck(cli_repo)
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    _check_out(tmp_path, cli_repo, {4: states[3], 5: states[4]})


def test_push_of_one_entry_to_an_empty_remote_carries_its_sources(
    tmp_path: Path, cli_repo: Path
) -> None:
    _, states = _sessions(tmp_path, cli_repo, 3)
    other = tmp_path / "other"
    assert vml(other, "init", "--block-size", "64K", other).code == 0
    assert vml(cli_repo, "remote", "add", "o", other).code == 0
    run = vml(cli_repo, "push", "-q", "o", "E3")
    assert run.code == 0, run
    _git_fsck(other)
    assert vml(other, "verify", "--all", "--read-data", "-q").code == 0
    out = tmp_path / "pushed"
    assert vml(other, "checkout", "-q", "E3", out).code == 0
    assert digest_area(out) == states[2]


def test_resolution_keeps_one_copy_of_each_layers_sources_not_one_per_block() -> None:
    """Resolving an image must cost what its layers and blocks hold, not their product.

    A memory image changes in most blocks at every save, so its blocks stack a delta per
    layer, and each layer's ``sources`` names thousands of disk blocks.  Each block whose
    deltas two layers name gets its own union of those layers' sources
    (chains.py ``_Resolution.block_map``: ``had | sources``): blocks x sources set entries
    (here 2048 x 3000 = 6M; for a 4 GiB memory image over 16 layers, billions).
    """
    from vml.plumbing.chains import _Resolution

    rng = random.Random(1)
    nblocks = 2048
    layers = [frozenset(rng.randbytes(20) for _ in range(1000)) for _ in range(3)]
    res = _Resolution("vm.ram", nblocks)
    for i, sources in enumerate(layers):  # newest first, each a delta on every block
        res.block_map({b: (True, bytes([i]) * 20) for b in range(nblocks)}, sources)
    for b in range(nblocks):
        res.settle(b, bytes(20))
    held = {id(r.sources): len(r.sources) for r in res.recipes.values()}
    assert sum(held.values()) <= 4 * sum(map(len, layers)), (
        f"{sum(held.values())} source entries held for {sum(map(len, layers))} named"
    )


@pytest.mark.parametrize("block", ["64K", "128K"])
def test_odd_sizes_and_small_blocks_come_back_exact(tmp_path: Path, block: str) -> None:
    """Short last pages (sizes not a multiple of the page), two block sizes: exact."""
    repo = tmp_path / "repo"
    assert vml(repo, "init", "--block-size", block, repo).code == 0
    rng = random.Random(3)
    area = tmp_path / "vm"
    area.mkdir()
    disk = bytearray(rng.randbytes(300_001))
    ram = bytearray(160_003)
    (area / "vm.conf").write_text("memory = 1M\n")
    states = []
    for _ in range(3):
        (area / "disk.img").write_bytes(disk)
        (area / "vm.ram").write_bytes(ram)
        assert vml(repo, "commit", "-q", area).code == 0
        states.append(digest_area(area))
        for _ in range(12):  # the page cache, including the disk's short last page
            run = rng.randrange(4, 9)
            src = rng.randrange(len(disk) // PAGE - run + 1)
            dst = rng.randrange(len(ram) // PAGE - run)
            ram[dst * PAGE : (dst + run) * PAGE] = disk[src * PAGE : (src + run) * PAGE]
        tail = len(disk) % PAGE
        ram[-tail:] = disk[-tail:]
        for _ in range(6):
            p = rng.randrange(len(disk) // PAGE)
            disk[p * PAGE : (p + 1) * PAGE] = rng.randbytes(PAGE)
    assert _ram_layer(repo, "E2")[1], "the memory references the disk"
    assert vml(repo, "verify", "--all", "--read-data", "-q").code == 0
    _git_fsck(repo)
    _check_out(tmp_path, repo, {n: s for n, s in enumerate(states, 1)})


def _forge_ram(repo: Path, edit: Callable[[Repo, Tree], None]) -> None:
    """Rewrite E2's memory image tree with ``edit`` (E2 keeps its parent E1)."""
    git = Repo(str(repo))
    try:
        ref = b"refs/vml/entries/2"
        c = git[git.refs[ref]]
        assert isinstance(c, Commit)
        root = git[c.tree]
        assert isinstance(root, Tree)
        images = git[root[b"images"][1]]
        assert isinstance(images, Tree)
        ram = git[images[b"vm.ram"][1]]
        assert isinstance(ram, Tree)
        edit(git, ram)
        git.object_store.add_object(ram)
        images[b"vm.ram"] = (0o040000, ram.id)
        git.object_store.add_object(images)
        root[b"images"] = (0o040000, images.id)
        git.object_store.add_object(root)
        c.tree = root.id
        git.object_store.add_object(c)
        git.refs[ref] = c.id
    finally:
        git.close()


def _sources_naming(git: Repo, ram: Tree, entries: list[tuple[bytes, int, bytes]]) -> None:
    t = Tree()
    for name, mode, sha in entries:
        t.add(name, mode, sha)
    git.object_store.add_object(t)
    ram[b"sources"] = (0o040000, t.id)


def _refs_world(tmp_path: Path, repo: Path) -> tuple[Path, list[bytes]]:
    area, _states = _sessions(tmp_path, repo, 2)
    _man, sources = _ram_layer(repo, "E2")
    assert sources
    return area, sources


def _other_blob(repo: Path, not_in: list[bytes]) -> bytes:
    """A blob of the repository that is not one of ``not_in`` (E1's disk block 0)."""
    git = Repo(str(repo))
    try:
        c = git[git.refs[b"refs/vml/entries/1"]]
        assert isinstance(c, Commit)
        _mode, sha = _walk(git, c.tree, [b"images", b"disk.img", b"blocks", b"0000", b"00"])
        blocks = git[sha]
        assert isinstance(blocks, Tree)
        for name, _m, s in blocks.iteritems():
            if bytes.fromhex(s.decode()) not in not_in and not name.endswith((b".d", b".r")):
                return bytes.fromhex(s.decode())
        raise AssertionError("no other blob")
    finally:
        git.close()


def _walk(git: Repo, tree: bytes, path: list[bytes]) -> tuple[int, bytes]:
    t = git[tree]
    assert isinstance(t, Tree)
    mode, sha = t[path[0]]
    return (mode, sha) if len(path) == 1 else _walk(git, sha, path[1:])


@pytest.mark.parametrize(
    "bad",
    ["upper-case name", "executable mode", "name is not its id", "a tree named", "empty"],
)
def test_a_malformed_sources_tree_is_refused(tmp_path: Path, cli_repo: Path, bad: str) -> None:
    _, sources = _refs_world(tmp_path, cli_repo)
    s = sources[0]
    entries = {
        "upper-case name": [(s.hex().upper().encode(), 0o100644, s.hex().encode())],
        "executable mode": [(s.hex().encode(), 0o100755, s.hex().encode())],
        "name is not its id": [(bytes(20).hex().encode(), 0o100644, s.hex().encode())],
        "a tree named": [(s.hex().encode(), 0o040000, s.hex().encode())],
        "empty": [],
    }[bad]
    _forge_ram(cli_repo, lambda git, ram: _sources_naming(git, ram, entries))
    run = vml(cli_repo, "checkout", "E2", tmp_path / "target")
    assert run.code == 7, run
    assert len(run.err.strip().splitlines()) == 1, run


def test_a_reference_to_a_blob_its_layer_does_not_name_is_refused(
    tmp_path: Path, cli_repo: Path
) -> None:
    """The sources tree names another blob than the deltas reference: git would not keep
    the referenced ones, so every reader refuses the entry."""
    _, sources = _refs_world(tmp_path, cli_repo)
    other = _other_blob(cli_repo, sources)
    h = other.hex().encode()
    _forge_ram(cli_repo, lambda git, ram: _sources_naming(git, ram, [(h, 0o100644, h)]))
    run = vml(cli_repo, "checkout", "E2", tmp_path / "target")
    assert run.code == 7, run
    assert "sources" in run.err, run
    assert vml(cli_repo, "verify", "--read-data", "E2").code == 7


def test_colliding_page_hashes_cost_a_bounded_number_of_reads_per_page(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest that crafts xxh3 collisions must not make a save quadratic.

    pageindex.py ``PageIndex.find`` tries every indexed candidate with the page's hash
    (``keys.index(h, at)`` loop, one read each in ``_confirm_many``) until one's bytes
    match: N memory pages colliding with M disk pages cost N x M reads.  The count of
    candidates confirmed per page must be bounded.
    """
    monkeypatch.setattr(pageindex, "_MASK", 0)  # every page collides
    calls = 0
    real = pageindex.PageIndex._confirm_many

    def counting(
        self: pageindex.PageIndex,
        ix: pageindex._Indexed,
        items: list[tuple[int, int]],
        data: bytes,
    ) -> list[object]:
        nonlocal calls
        calls += len(items)
        return list(real(self, ix, items, data))

    monkeypatch.setattr(pageindex.PageIndex, "_confirm_many", counting)
    area, rng = _area(tmp_path)
    (area / "vm.ram").write_bytes(rng.randbytes(RAM))  # memory of its own: no page matches
    assert vml(cli_repo, "commit", "-q", area).code == 0
    looked_up = RAM // PAGE
    assert calls <= 16 * looked_up, f"{calls} candidate reads for {looked_up} pages"


def test_a_save_without_the_area_cache_builds_referencing_parents_exactly(
    tmp_path: Path, cli_repo: Path
) -> None:
    """With the area cache gone, a save builds the parent's blocks (references included)
    to compare; status does too; the entries come back exact."""
    area, states = _sessions(tmp_path, cli_repo, 3)
    rng = random.Random(11)
    for _ in range(2):
        shutil.rmtree(area / ".vml" / "cache")
        assert vml(cli_repo, "status", area).code == 0
        assert vml(cli_repo, "commit", "-q", area).code == 0
        states.append(digest_area(area))
        _session(area, rng)
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    _check_out(tmp_path, cli_repo, {n: s for n, s in enumerate(states, 1)})


def _ram_block0_delta(git: Repo, ram: Tree, refs: dict[int, tuple[bytes, int]]) -> None:
    """E2's memory: block 0 becomes one version-3 delta (over E1's zeros) with ``refs``;
    the sources tree names every source the references use."""
    from dulwich.objects import Blob

    from vml.plumbing.deltas import encode_delta

    delta = Blob.from_string(encode_delta(bytes(BLOCK), [], PAGE, (), refs))
    git.object_store.add_object(delta)
    leaf, mid, top = Tree(), Tree(), Tree()
    leaf.add(b"00.d", 0o100644, delta.id)
    git.object_store.add_object(leaf)
    mid.add(b"00", 0o040000, leaf.id)
    git.object_store.add_object(mid)
    top.add(b"0000", 0o040000, mid.id)
    git.object_store.add_object(top)
    ram[b"blocks"] = (0o040000, top.id)
    names = sorted({s for s, _ in refs.values()})
    _sources_naming(git, ram, [(s.hex().encode(), 0o100644, s.hex().encode()) for s in names])


@pytest.mark.parametrize("bad", ["missing blob", "a tree as source", "offset past its end"])
def test_a_hostile_reference_gives_one_line_and_exit_7(
    tmp_path: Path, cli_repo: Path, bad: str
) -> None:
    _, sources = _refs_world(tmp_path, cli_repo)
    git = Repo(str(cli_repo))
    try:
        c = git[git.refs[b"refs/vml/entries/1"]]
        assert isinstance(c, Commit)
        tree_id = bytes.fromhex(c.tree.decode())
    finally:
        git.close()
    src = {
        "missing blob": bytes.fromhex("ab" * 20),
        "a tree as source": tree_id,
        "offset past its end": sources[0],
    }[bad]
    off = (1 << 40) if bad == "offset past its end" else 0
    refs = {k: (src, off + k * PAGE) for k in range(4)}
    _forge_ram(cli_repo, lambda git, ram: _ram_block0_delta(git, ram, refs))
    run = vml(cli_repo, "checkout", "E2", tmp_path / "target")
    assert run.code == 7, run
    assert "Traceback" not in run.err
    assert len([ln for ln in run.err.splitlines() if ln.strip()]) == 1, run
    run = vml(cli_repo, "verify", "--read-data", "E2")
    assert run.code == 7, run


def test_an_area_of_many_image_files_saves_within_the_open_files_limit(tmp_path: Path) -> None:
    """A VMware disk split in 2 GB extents is hundreds of image files (1 TB: 512).

    saving.py ``_indexable`` / pageindex.py ``PageIndex.add`` keep every saved image's file
    open (``os.open(image.source)``) and its records (a file and an mmap) until the entry
    is published: two descriptors per image, so ~500 images exceed the usual soft limit
    of 1024 ("Too many open files"), where VML before page references saved them.
    """
    import resource
    import sys

    rng = random.Random(5)
    area = tmp_path / "vm"
    area.mkdir()
    (area / "vm.conf").write_text("memory = 1M\n")
    for i in range(300):  # sparse: one page of data in 128 KiB
        with open(area / f"disk-s{i:03}.vmdk", "wb") as f:
            f.truncate(128 << 10)
            f.write(rng.randbytes(PAGE))
    repo = tmp_path / "repo"
    assert vml(repo, "init", "--block-size", "64K", repo).code == 0

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    run = subprocess.run(
        [sys.executable, "-m", "vml", "-R", str(repo), "commit", "-q", str(area)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr


def test_git_gc_prune_now_keeps_every_reference(tmp_path: Path, cli_repo: Path) -> None:
    _, states = _sessions(tmp_path, cli_repo, 4)
    assert vml(cli_repo, "rm", "--force", "E2").code == 0
    subprocess.run(
        ["git", "-C", str(cli_repo), "gc", "--prune=now", "-q"], check=True, capture_output=True
    )
    _git_fsck(cli_repo)
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    _check_out(tmp_path, cli_repo, {1: states[0], 3: states[2], 4: states[3]})


def test_a_save_holds_no_per_page_state_for_the_deltas_it_wrote(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory flat: what a save keeps of the deltas it wrote (for the page index) is
    bounded by a fixed budget for the whole save, whatever the change; past it those
    deltas' pages are not referenced, and every entry still comes back exact.

    (Before: a dict entry and a tuple per changed page of every delta, ~136 bytes a
    page, held until the entry was published: a 1 TB disk with 10 M scattered changed
    pages held over 1 GB.)
    """
    from vml.plumbing import images

    held = 0
    real = images.save_image

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal held
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        held += sum(len(h) for h in out[3].places.values())
        return out

    monkeypatch.setattr("vml.plumbing.saving.save_image", counting)
    area, rng = _area(tmp_path)
    (area / "vm.ram").unlink()
    assert vml(cli_repo, "commit", "-q", area).code == 0
    disk = bytearray((area / "disk.img").read_bytes())
    for n in range(DISK // BLOCK):  # every block: 6 scattered pages changed
        for k in range(0, 12, 2):
            at = n * BLOCK + k * PAGE
            disk[at : at + PAGE] = rng.randbytes(PAGE)
    (area / "disk.img").write_bytes(disk)
    held = 0
    assert vml(cli_repo, "commit", "-q", area).code == 0
    # A delta's header: 20 bytes, 4 a page it names (12 more a reference).
    assert 0 < held <= (DISK // BLOCK) * (20 + 6 * 4)
    budget = held // 3
    monkeypatch.setattr("vml.plumbing.saving.PLACES_BUDGET", budget)
    for _ in range(3):
        disk = bytearray((area / "disk.img").read_bytes())
        for n in range(DISK // BLOCK):
            at = n * BLOCK + rng.randrange(BLOCK // PAGE) * PAGE
            disk[at : at + PAGE] = rng.randbytes(PAGE)
        (area / "disk.img").write_bytes(disk)
        held = 0
        assert vml(cli_repo, "commit", "-q", area).code == 0
        assert held <= budget


def test_sessions_past_the_places_budget_come_back_exact(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save whose budget for delta headers is spent (here: none at all) references
    only what it can place, and every entry checks out exact."""
    monkeypatch.setattr("vml.plumbing.saving.PLACES_BUDGET", 0)
    _, states = _sessions(tmp_path, cli_repo, 4)
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    _check_out(tmp_path, cli_repo, {n: s for n, s in enumerate(states, 1)})


def test_references_into_many_images_through_few_open_files_come_back_exact(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index confirms pages through a few descriptors kept open (evicting the
    oldest): memory pages copied from 12 disk images, two descriptors, every
    reference exact."""
    monkeypatch.setattr(pageindex, "OPEN_FILES", 2)
    rng = random.Random(3)
    area = tmp_path / "vm"
    area.mkdir()
    (area / "vm.conf").write_text("memory = 1M\n")
    disks = [rng.randbytes(4 * BLOCK) for _ in range(12)]
    for i, d in enumerate(disks):
        (area / f"disk{i:02}.img").write_bytes(d)
    (area / "vm.ram").write_bytes(bytes(RAM))
    assert vml(cli_repo, "commit", "-q", area).code == 0
    states = [digest_area(area)]
    ram = bytearray(RAM)
    for dst in range(0, RAM // PAGE - 8, 8):  # runs of 8 pages from disks in turn
        d = disks[rng.randrange(len(disks))]
        src = rng.randrange(len(d) // PAGE - 8)
        ram[dst * PAGE : (dst + 8) * PAGE] = d[src * PAGE : (src + 8) * PAGE]
    (area / "vm.ram").write_bytes(ram)
    assert vml(cli_repo, "commit", "-q", area).code == 0
    states.append(digest_area(area))
    _, sources = _ram_layer(cli_repo, "E2")
    assert len(sources) > 2, "the memory must reference more images than files kept open"
    assert vml(cli_repo, "verify", "--all", "--read-data", "-q").code == 0
    _check_out(tmp_path, cli_repo, {1: states[0], 2: states[1]})
