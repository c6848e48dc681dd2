"""A checkout into a new folder takes the memory file's reference pages from the disk's build (#12).

The memory image's version-3 deltas name the disk's blobs (whole blocks and
the raw bytes of the disk's own page deltas).  Building the disk reads and
checks those blobs anyway: their pages are kept as the disk is built, and
the memory image reads again only the sources nothing built before it read.
Damage is still caught: a page taken from a damaged copy fails the memory
block's own check, and that block is built again from objects read checked.
"""

from __future__ import annotations

import dataclasses
import os
import random
import zlib
from pathlib import Path
from typing import ClassVar

import pytest
from dulwich.object_format import DEFAULT_OBJECT_FORMAT
from dulwich.pack import load_pack_index

from tests.conftest import digest_area
from tests.reliability.helpers import vml_in_process as vml
from tests.reliability.test_page_references import DISK, PAGE, RAM, _ram_layer, _saved
from vml.plumbing import refs as refs_mod
from vml.plumbing import restoring
from vml.plumbing.chains import ResolvedImage, resolve_image
from vml.plumbing.packreader import PackReader, parse_object_header
from vml.plumbing.refpages import RefPages
from vml.plumbing.repository import open_repository


class _Spy(RefPages):
    """A store that remembers what it captured and what it was given."""

    made: ClassVar[list[_Spy]] = []
    # Not empty: the bytes handed to capture are damaged on purpose.
    alter: ClassVar[list[object]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.took: set[bytes] = set()
        _Spy.made.append(self)

    def capture(self, sha: bytes, data: bytes, checked: bool = True) -> None:
        if sha in self._wanted:
            self.took.add(sha)
            if _Spy.alter:
                # A page of it changed (what a damaged copy that still passed the
                # disk's block check would give).
                changed = bytearray(data)
                for k in range(0, len(changed), 4096):
                    changed[k] ^= 0x5A
                data = bytes(changed)
        super().capture(sha, data, checked)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> type[_Spy]:
    """Stores spied on; plans waited for before the first image is built (no race)."""
    _Spy.made = []
    _Spy.alter = []
    monkeypatch.setattr(restoring, "RefPages", _Spy)
    plan = restoring.Builder._plan

    def plan_and_wait(self: restoring.Builder) -> None:
        plan(self)
        for _image, _store, done in (self._planned or {}).values():
            done.result()

    monkeypatch.setattr(restoring.Builder, "_plan", plan_and_wait)
    return _Spy


def _images(repo: Path, entry: str) -> dict[str, ResolvedImage]:
    r = open_repository(repo)
    reader = PackReader(r)
    try:
        commit = refs_mod.resolve_name(r, entry, refs_mod.read_refs(r))
        out = {}
        for path in ("disk.img", "vm.ram"):
            image = resolve_image(reader, commit, path)
            assert image is not None
            out[path] = image
        return out
    finally:
        reader.close()
        r.close()


def test_a_new_folder_takes_the_memory_pages_from_the_disk_blocks_and_deltas(
    tmp_path: Path, cli_repo: Path, spy: type[_Spy]
) -> None:
    _, states = _saved(tmp_path, cli_repo, sessions=3)
    out = tmp_path / "out"
    assert vml(cli_repo, "checkout", "-q", "E4", out).code == 0
    assert digest_area(out) == states[3]
    (ram,) = [s for s in spy.made if s.took]
    assert ram.captured_bytes > 0
    # Every source the disk's build read was taken from it, none read twice.
    disk = _images(cli_repo, "E4")["disk.img"]
    bases = {r.base for r in disk.recipes.values() if r.base is not None}
    deltas = {d for r in disk.recipes.values() for d in r.deltas}
    assert ram.took & bases, "a whole disk block gave pages"
    assert ram.took & deltas, "a disk block's page delta gave pages (a block that is a delta)"
    assert ram.took == set(ram._slots) & (bases | deltas)


def test_plans_made_while_the_disk_is_built_give_exact_files(
    tmp_path: Path, cli_repo: Path
) -> None:
    """Without waiting for the plans: whatever was captured or not, the files are exact."""
    _, states = _saved(tmp_path, cli_repo, sessions=3)
    for n in (2, 3, 4):
        out = tmp_path / f"out{n}"
        assert vml(cli_repo, "checkout", "-q", f"E{n}", out).code == 0
        assert digest_area(out) == states[n - 1]


def test_an_in_place_checkout_gathers_the_pages_as_before(
    tmp_path: Path, cli_repo: Path, spy: type[_Spy]
) -> None:
    area, states = _saved(tmp_path, cli_repo, sessions=2)
    assert vml(cli_repo, "commit", "-q", area).code == 0  # E4: the area is clean
    assert vml(cli_repo, "checkout", "-q", "E2", area).code == 0
    assert digest_area(area) == states[1]
    assert not [s for s in spy.made if s.took], "an in-place checkout plans nothing"


def test_a_damaged_page_taken_from_the_disk_build_fails_the_memory_blocks_check(
    tmp_path: Path, cli_repo: Path, spy: type[_Spy]
) -> None:
    _, states = _saved(tmp_path, cli_repo, sessions=2)
    spy.alter.append(True)
    out = tmp_path / "out"
    assert vml(cli_repo, "checkout", "-q", "E3", out).code == 0
    assert any(s.took for s in spy.made), "damaged pages were handed over"
    # The memory blocks built on them failed their checks and were built again.
    assert digest_area(out) == states[2]


def _restream(pack: Path, sha: bytes) -> None:
    """Object ``sha`` of ``pack`` given other bytes in a valid zlib stream of the same length."""
    index = load_pack_index(str(pack.with_suffix(".idx")), DEFAULT_OBJECT_FORMAT)
    offset = index.object_offset(sha)
    data = bytearray(pack.read_bytes())
    _type, size, head = parse_object_header(bytes(data[offset : offset + 32]))
    old = zlib.decompressobj()
    content = bytearray(old.decompress(bytes(data[offset + head :])))
    used = len(data) - offset - head - len(old.unused_data)
    for k in range(0, size, 4096):
        content[k] ^= 0x5A
    for level in (0, 1, 6, 9):
        new = zlib.compress(bytes(content), level)
        if len(new) <= used:
            break
    else:
        raise AssertionError("the changed object does not fit")
    data[offset + head : offset + head + len(new)] = new
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))


@pytest.mark.parametrize("twice", [True, False], ids=["good-copy-elsewhere", "only-copy"])
def test_a_damaged_referenced_disk_block_is_detected(
    tmp_path: Path, cli_repo: Path, spy: type[_Spy], twice: bool
) -> None:
    """A disk block the memory references, damaged: passed over for a good copy, or refused."""
    _, states = _saved(tmp_path, cli_repo, sessions=2)
    images = _images(cli_repo, "E3")
    disk, ram = images["disk.img"], images["vm.ram"]
    bases = {r.base for r in disk.recipes.values() if r.base is not None}
    named = {s for r in ram.recipes.values() for s in r.sources}
    victim = sorted(bases & named)[0]
    packs = sorted((cli_repo / "objects" / "pack").glob("*.pack"))
    (home,) = [
        p
        for p in packs
        if victim
        in {
            s
            for s, _o, _c in load_pack_index(
                str(p.with_suffix(".idx")), DEFAULT_OBJECT_FORMAT
            ).iterentries()
        }
    ]
    if twice:
        # A second copy, named so that readers try it first, damaged.
        home = _copy(home, home.with_name("pack-" + "0" * 40 + ".pack"))
    _restream(home, victim)
    out = tmp_path / "out"
    run = vml(cli_repo, "checkout", "-q", "E3", out)
    if twice:
        assert run.code == 0, run
        assert digest_area(out) == states[2]
    else:
        assert run.code == 7 and "damaged" in run.err + run.out, run
        want = states[2]
        for path, item in digest_area(out).items() if out.exists() else ():
            assert want.get(path) == item, f"{path} was written with wrong content"


def _copy(pack: Path, to: Path) -> Path:
    to.write_bytes(pack.read_bytes())
    to.with_suffix(".idx").write_bytes(pack.with_suffix(".idx").read_bytes())
    return to


def test_a_memory_file_whose_name_sorts_first_takes_its_pages_from_the_disk(
    tmp_path: Path, cli_repo: Path, spy: type[_Spy]
) -> None:
    """A VMware memory file (``vm-564d.vmem``) sorts before its disk (``vm.vmdk``).

    Built in the entry's order, the memory came first and captured nothing:
    the files are built memory last, the order commit saves them in.
    """
    rng = random.Random(11)
    area = tmp_path / "vm"
    area.mkdir()
    disk = bytearray(rng.randbytes(DISK))
    (area / "vm.ram").write_bytes(bytes(RAM))
    (area / "zz-disk.img").write_bytes(disk)
    (area / "vm.conf").write_text("memory = 1M\n")
    assert vml(cli_repo, "commit", "-q", area).code == 0
    ram = bytearray(RAM)
    for _ in range(20):  # the guest writes files and caches them
        run = rng.randrange(4, 9)
        src = rng.randrange(DISK // PAGE - run)
        disk[src * PAGE : (src + run) * PAGE] = rng.randbytes(run * PAGE)
        dst = rng.randrange(RAM // PAGE - run)
        ram[dst * PAGE : (dst + run) * PAGE] = disk[src * PAGE : (src + run) * PAGE]
    (area / "vm.ram").write_bytes(ram)
    (area / "zz-disk.img").write_bytes(disk)
    assert vml(cli_repo, "commit", "-q", area).code == 0
    assert _ram_layer(cli_repo, "E2")[1], "the memory references the disk"
    out = tmp_path / "out"
    assert vml(cli_repo, "checkout", "-q", "E2", out).code == 0
    assert digest_area(out) == digest_area(area)
    taken = [s for s in spy.made if s.took]
    assert taken and taken[0].captured_bytes > 0, "the disk's build gave the memory its pages"


def test_an_image_without_checks_takes_no_page_from_a_blob_read_unchecked(
    tmp_path: Path, cli_repo: Path, spy: type[_Spy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory image saved before checks existed is built from sources read checked.

    The disk (with checks) reads its blobs unchecked and checks its blocks:
    a copy damaged only in bytes a newer delta overwrites passes.  Its pages
    handed to an image with no block check of its own were trusted, and
    the memory failed its digest where reading the source checked passes
    over to a good copy.
    """
    _, states = _saved(tmp_path, cli_repo, sessions=2)
    real = restoring.resolve_image

    def memory_without_checks(reader: PackReader, commit: bytes, path: str) -> ResolvedImage | None:
        image = real(reader, commit, path)
        if image is not None and path == "vm.ram":
            image = dataclasses.replace(image, checks=None, checks_id=None)
        return image

    monkeypatch.setattr(restoring, "resolve_image", memory_without_checks)
    spy.alter.append(True)  # what the disk's build read is damaged where it did not look
    out = tmp_path / "out"
    run = vml(cli_repo, "checkout", "-q", "E3", out)
    assert run.code == 0, run
    assert digest_area(out) == states[2]
