"""A damaged pack index stays local: the pack is set aside, the rest stays usable, gc --repair mends it.

E2's objects sit in a pack of their own (``world``, in conftest.py).
Its index is truncated, garbled or swapped for another pack's, or the pack
itself is cut short.  Every command must then still serve E1, say once that
the pack is set aside (no traceback), ``fsck`` must name the pack and E2,
``gc`` must refuse to delete anything, and ``gc --repair`` must rebuild the
index from a whole pack (byte for byte what the writer made) or salvage
what a damaged pack still holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import digest_area, edit, three_entries
from tests.reliability.conftest import World
from tests.reliability.helpers import git_fsck, one_line_error, repo_state
from tests.reliability.helpers import vml_in_process as vml
from vml.plumbing import packscan
from vml.plumbing.packreader import blob_id
from vml.plumbing.packscan import scan_pack
from vml.plumbing.packwriter import PackWriter
from vml.plumbing.repository import Repository


def _writable(path: Path) -> Path:
    os.chmod(path, 0o644)
    return path


def _truncated_index(pack: Path) -> None:
    idx = _writable(pack.with_suffix(".idx"))
    idx.write_bytes(idx.read_bytes()[:100])


def _garbled_index(pack: Path) -> None:
    idx = _writable(pack.with_suffix(".idx"))
    data = bytearray(idx.read_bytes())
    data[8 + 1024 + 5] ^= 0x40  # inside the table of object ids
    idx.write_bytes(bytes(data))


def _another_packs_index(pack: Path) -> None:
    other = next(p for p in pack.parent.glob("pack-*.pack") if p != pack)
    _writable(pack.with_suffix(".idx")).write_bytes(other.with_suffix(".idx").read_bytes())


def _truncated_pack(pack: Path) -> None:
    with open(_writable(pack), "r+b") as f:
        f.truncate(pack.stat().st_size // 2)


INDEX_DAMAGE = [_truncated_index, _garbled_index, _another_packs_index]
ALL_DAMAGE = [*INDEX_DAMAGE, _truncated_pack]
IDS = ["truncated-index", "garbled-index", "another-packs-index", "truncated-pack"]


@pytest.mark.parametrize("damage", ALL_DAMAGE, ids=IDS)
def test_a_bad_pack_is_set_aside_and_every_other_entry_stays_usable(
    tmp_path: Path, world: World, damage: Callable[[Path], None]
) -> None:
    repo, a1, _a2, pack2 = world
    damage(pack2)
    for args in (
        ["log"],
        ["log", "--graph"],
        ["log", "--json"],
        ["show", "E1"],
        ["areas"],
        ["status", a1],
        ["verify", "E1"],
    ):
        run = vml(repo, *args)
        assert run.code == 0, (args, run)
        assert "Traceback" not in run.err
        # Said once, on one line, naming the pack.
        assert run.err.count("is set aside") == 1 and pack2.stem in run.err, (args, run.err)
    logged = json.loads(vml(repo, "log", "--json").out)
    assert {e["id"] for e in logged} == {"E1", "E2"}
    assert [e["damage"] for e in logged if e["id"] == "E1"] == [None]
    assert vml(repo, "checkout", "-q", "E1", tmp_path / "e1").code == 0
    assert digest_area(tmp_path / "e1") == digest_area(a1)

    run = vml(repo, "fsck")
    assert run.code == 7 and pack2.stem in run.out, run
    assert "entries affected: E2" in run.out, run.out

    before = repo_state(repo)
    run = vml(repo, "gc")
    assert run.code == 7 and "set aside" in one_line_error(run)
    assert repo_state(repo) == before  # nothing deleted, nothing moved

    # Saving goes on (into a pack of its own).
    edit(a1 / "disk.img", 4096, b"new" * 100)
    assert vml(repo, "commit", "-q", a1).code == 0
    assert vml(repo, "verify", "E3").code == 0

    # Sharing sends whole entries only.
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "far.git")], check=True)
    assert vml(repo, "remote", "add", "far", tmp_path / "far.git").code == 0
    run = vml(repo, "push", "far", "E2")
    assert run.code == 7 and "nothing was sent" in one_line_error(run)
    assert vml(repo, "push", "far", "E3").code == 0
    git_fsck(tmp_path / "far.git")


@pytest.mark.parametrize("damage", INDEX_DAMAGE, ids=IDS[:3])
def test_gc_repair_rebuilds_the_index_of_a_whole_pack(
    tmp_path: Path, world: World, damage: Callable[[Path], None]
) -> None:
    repo, _a1, a2, pack2 = world
    good = pack2.with_suffix(".idx").read_bytes()
    damage(pack2)
    run = vml(repo, "gc", "--repair")
    assert run.code == 0 and "rebuilt its index" in run.out and "warning" not in run.err, run
    assert pack2.with_suffix(".idx").read_bytes() == good  # what the writer made
    assert not (repo / "vml" / "quarantine").exists()
    assert vml(repo, "fsck").code == 0
    git_fsck(repo)
    assert vml(repo, "checkout", "-q", "E2", tmp_path / "e2").code == 0
    assert digest_area(tmp_path / "e2") == digest_area(a2)
    assert vml(repo, "gc").code == 0


def test_gc_repair_salvages_a_damaged_pack_and_moves_it_aside(tmp_path: Path, world: World) -> None:
    repo, a1, _a2, pack2 = world
    _truncated_pack(pack2)
    run = vml(repo, "gc", "--repair")
    assert run.code == 0 and "salvaged" in run.out, run
    assert "warning" not in run.err  # the repair itself said what became of the pack
    aside = sorted(p.name for p in (repo / "vml" / "quarantine").iterdir())
    assert aside == [pack2.with_suffix(".idx").name, pack2.name]
    assert not pack2.exists()
    # Nothing is set aside now: what was lost is named by entry, and gc runs again.
    run = vml(repo, "verify", "--all")
    assert run.code == 7 and "entries affected: E2" in run.out, run
    assert "set aside" not in run.err
    # gc cannot see what E2's lost trees named: it deletes nothing until E2 goes.
    before = repo_state(repo)
    run = vml(repo, "gc")
    assert run.code == 7 and "gc deletes nothing" in one_line_error(run)
    assert repo_state(repo) == before
    assert vml(repo, "rm", "--force", "E2").code == 0
    assert vml(repo, "gc").code == 0
    assert vml(repo, "fsck").code == 0
    assert vml(repo, "checkout", "-q", "E1", tmp_path / "e1").code == 0
    assert digest_area(tmp_path / "e1") == digest_area(a1)


def test_a_pack_that_lost_its_index_is_never_collected(tmp_path: Path, world: World) -> None:
    repo, _a1, a2, pack2 = world
    pack2.with_suffix(".idx").unlink()
    before = repo_state(repo)
    run = vml(repo, "gc")
    assert run.code == 7 and "has no index" in one_line_error(run)
    assert repo_state(repo) == before
    assert vml(repo, "gc", "--repair").code == 0
    assert vml(repo, "checkout", "-q", "E2", tmp_path / "e2").code == 0
    assert digest_area(tmp_path / "e2") == digest_area(a2)


@pytest.mark.parametrize("offsets", [True, False], ids=["ofs-deltas", "ref-deltas"])
def test_an_index_rebuilt_from_a_pack_git_deltified_matches_gits(
    tmp_path: Path, offsets: bool
) -> None:
    """Packs fetched from git servers hold deltas git made; repair resolves them."""
    repo = three_entries(tmp_path / "repo", tmp_path / "area")
    repo.close()
    subprocess.run(
        [
            "git",
            "-c",
            f"repack.useDeltaBaseOffset={'true' if offsets else 'false'}",
            "repack",
            "-adfq",
            "--window=50",
            "--depth=50",
        ],
        cwd=tmp_path / "repo",
        check=True,
    )
    (pack,) = (tmp_path / "repo" / "objects" / "pack").glob("pack-*.pack")
    listing = subprocess.run(
        ["git", "verify-pack", "-v", str(pack.with_suffix(".idx"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "chain length" in listing  # git did make deltas
    good = pack.with_suffix(".idx").read_bytes()
    _truncated_index(pack)
    run = vml(tmp_path / "repo", "gc", "--repair")
    assert run.code == 0 and "rebuilt its index" in run.out, run
    assert pack.with_suffix(".idx").read_bytes() == good
    assert vml(tmp_path / "repo", "verify", "--all", "--read-data").code == 0


def test_reading_a_pack_from_its_start_keeps_memory_flat(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object that inflates a thousandfold is streamed through SHA-1, a chunk at a time."""
    monkeypatch.setattr(packscan, "_CHUNK", 16 << 10)
    big = bytes(1 << 20)  # 1 MiB of zeros: a ~1 KiB zlib stream
    w = PackWriter(repo)
    w.add_blob(big)
    w.add_blob(b"small")
    name = w.finish()
    w.release()
    del big
    tracemalloc.start()
    try:
        scan = scan_pack(repo.objects_dir / "pack" / f"{name}.pack")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scan.whole and {o.sha for o in scan.objects} == {
        blob_id(bytes(1 << 20)),
        blob_id(b"small"),
    }
    assert peak < 256 << 10, peak
