"""A new folder's memory file, planned from its deltas' headers alone, comes back exact (#12).

The plan of a memory file's reference pages inflates only the start of each
delta, unchecked.  Whatever it finds (a damaged copy, pages beyond the
memory budget, a checkout killed half way), the files come back exact, with
their holes where a restore without a plan leaves them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from dulwich.object_format import DEFAULT_OBJECT_FORMAT
from dulwich.pack import load_pack_index

from tests.conftest import allocated, digest_area
from tests.reliability.helpers import vml_in_process as vml
from tests.reliability.test_crash import killed
from tests.reliability.test_page_references import _ram_layer, _saved
from tests.reliability.test_refpages_capture import _copy, _images, _restream
from vml.plumbing import restoring
from vml.plumbing.chains import ResolvedImage
from vml.plumbing.packreader import PackReader
from vml.plumbing.refpages import RefPages
from vml.plumbing.repository import open_repository


def _data_map(path: Path) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA / SEEK_HOLE)."""
    spans = []
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while True:
            try:
                a = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            off = os.lseek(fd, a, os.SEEK_HOLE)
            spans.append((a, off))
    finally:
        os.close(fd)
    return spans


def _exact_with_holes(
    out: Path, want: dict[str, tuple[object, ...]], repo: Path, entry: str
) -> None:
    """``out`` holds ``want``, its holes where a restore without a plan leaves them."""
    assert digest_area(out) == want
    ref = out.parent / f"{out.name}-unplanned"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(restoring.Builder, "_plan", lambda self: setattr(self, "_planned", {}))
        assert vml(repo, "checkout", "-q", entry, ref).code == 0
    for name in ("vm.ram", "disk.img"):
        assert _data_map(out / name) == _data_map(ref / name), f"{name}: holes moved"
        assert allocated(out / name) == allocated(ref / name), f"{name}: holes not kept"
    assert not list((out / ".vml" / "tmp").glob("*")), "a temporary file is left"


@pytest.mark.parametrize("n", [36, 40, 44])
def test_a_checkout_killed_while_the_memory_file_is_built_resumes_exactly(
    tmp_path: Path, cli_repo: Path, n: int
) -> None:
    """Killed with pages gathered (some in a spill file): redone exactly, nothing left over."""
    _, states = _saved(tmp_path, cli_repo, sessions=2)
    assert _ram_layer(cli_repo, "E3")[1], "the memory references the disk"
    out = tmp_path / "out"
    # Progress: the disk's 32 blocks, then the memory's 16 (the small files between).
    assert killed("checkout", cli_repo, n, "E3", out)
    assert json.loads((out / ".vml" / "area.json").read_text())["pending"]
    want = states[2]
    for path, item in digest_area(out).items():
        assert want.get(path) == item, f"{path} is under its name, not whole"
    assert "vm.ram" not in digest_area(out), "the memory file was still being built"
    assert vml(cli_repo, "checkout", "-q", "E3", out).code == 0
    _exact_with_holes(out, want, cli_repo, "E3")


class _Spilled(RefPages):
    spilled = False

    def _put(self, pages: bytes) -> None:
        super()._put(pages)
        _Spilled.spilled = _Spilled.spilled or self._file is not None


@pytest.mark.parametrize("checks", [True, False], ids=["checked", "without-checks"])
def test_memory_pages_beyond_the_budget_come_back_exact(
    tmp_path: Path, cli_repo: Path, monkeypatch: pytest.MonkeyPatch, checks: bool
) -> None:
    """A budget of one page: every other page goes through the spill file."""
    _, states = _saved(tmp_path, cli_repo, sessions=2)
    monkeypatch.setattr(restoring, "MEMORY", 4096)
    _Spilled.spilled = False
    monkeypatch.setattr(restoring, "RefPages", _Spilled)
    if not checks:
        real = restoring.resolve_image

        def memory_without_checks(
            reader: PackReader, commit: bytes, path: str
        ) -> ResolvedImage | None:
            image = real(reader, commit, path)
            if image is not None and path == "vm.ram":
                image = dataclasses.replace(image, checks=None, checks_id=None)
            return image

        monkeypatch.setattr(restoring, "resolve_image", memory_without_checks)
    out = tmp_path / "out"
    assert vml(cli_repo, "checkout", "-q", "E3", out).code == 0
    assert _Spilled.spilled
    monkeypatch.undo()
    _exact_with_holes(out, states[2], cli_repo, "E3")


def test_a_memory_delta_whose_first_copy_is_damaged_is_built_from_the_good_one(
    tmp_path: Path, cli_repo: Path
) -> None:
    """The plan reads the damaged copy's header (it does not parse): the block is left to
    its build, which passes over to the good copy."""
    _, states = _saved(tmp_path, cli_repo, sessions=2)
    ram = _images(cli_repo, "E3")["vm.ram"]
    victim = sorted(d for r in ram.recipes.values() if r.sources for d in r.deltas)[-1]
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
    # A second copy, named so that readers try it first, damaged (its magic among others).
    _restream(_copy(home, home.with_name("pack-" + "0" * 40 + ".pack")), victim)
    repo = open_repository(cli_repo)
    reader = PackReader(repo)
    try:
        assert not reader.read_head(victim, 4).startswith(b"VMLD"), "the plan sees the damage"
    finally:
        reader.close()
        repo.close()
    out = tmp_path / "out"
    run = vml(cli_repo, "checkout", "-q", "E3", out)
    assert run.code == 0, run
    assert digest_area(out) == states[2]
