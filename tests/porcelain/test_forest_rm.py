"""``vml rm``: removing entries re-parents their children without copying image data."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import edit, make_area
from vml.errors import UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import load_state
from vml.plumbing.repository import Repository, open_repository
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit
from vml.porcelain.fsck import fsck
from vml.porcelain.names import create_branch, create_tag
from vml.porcelain.rm import rm
from vml.porcelain.status import status
from vml.porcelain.verify import verify

BLOCK = 64 << 10


def snapshot(folder: Path) -> dict[str, str]:
    """File -> sha256, ``.vml`` excluded."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".vml" not in p.relative_to(folder).parts
    }


def check_all(repo: Repository, states: dict[str, dict[str, str]], tmp: Path) -> None:
    """Every surviving entry rebuilds to the state it was saved from; checks are clean."""
    table = refs_mod.read_refs(repo)
    for n in sorted(table.entries):
        out = tmp / f"check-E{n}"
        checkout(repo, f"E{n}", out)
        assert snapshot(out) == states[f"E{n}"], f"E{n} changed"
    res = verify(repo, [], all_entries=True, read_data=True)
    assert res.clean, res.problems
    assert fsck(repo).clean
    git = subprocess.run(
        ["git", "fsck", "--full", "--strict"], cwd=repo.path, capture_output=True, text=True
    )
    assert git.returncode == 0, git.stderr


def chain(repo: Repository, area: Path, n: int, seed: int = 5) -> dict[str, dict[str, str]]:
    """Save ``n`` entries, editing the disk between saves (page edits and whole blocks)."""
    rng = random.Random(seed)
    states: dict[str, dict[str, str]] = {}
    for i in range(n):
        r = commit(repo, area, message=f"state {i}", allow_empty=True)
        states[r.entry] = snapshot(area)
        size = rng.choice([100, 5000, BLOCK + 3000])
        edit(area / "disk.img", rng.randrange(0, (1 << 20) - size), rng.randbytes(size))
    return states


def test_rm_middle_entries_keeps_every_other_entry(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    states = chain(repo, area, 7)
    res = rm(repo, ["E3"])
    assert res.removed == ["E3"]
    table = refs_mod.read_refs(repo)
    assert sorted(table.entries) == [1, 2, 4, 5, 6, 7]
    # E4 now hangs under E2, and says why.
    log = subprocess.run(
        ["git", "log", "-1", "--format=%P%n%B", table.entries[4].hex()],
        cwd=repo.path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert log.splitlines()[0] == table.entries[2].hex()
    assert "VML-Rewritten: E3 removed, re-parented onto E2" in log
    assert "VML-Parent: E2" in log
    rm(repo, ["E5", "6"])
    check_all(repo, {k: v for k, v in states.items() if k in ("E1", "E2", "E4", "E7")}, tmp_path)


def test_rm_full_root_makes_children_full(repo: Repository, area: Path, tmp_path: Path) -> None:
    states = chain(repo, area, 3)
    # A second child of E1: a differential saved after E3.
    r = commit(repo, area, kind="differential", message="diff")
    states[r.entry] = snapshot(area)
    # The area holds E4; E1 is free to go.
    res = rm(repo, ["E1"])
    assert res.anchored_blocks > 0 or res.reused_blocks > 0
    table = refs_mod.read_refs(repo)
    from vml.plumbing.chains import read_entry
    from vml.plumbing.packreader import PackReader

    reader = PackReader(repo)
    try:
        assert read_entry(reader, table.entries[2]).meta.kind == "full"
        assert read_entry(reader, table.entries[2]).parent is None
        assert read_entry(reader, table.entries[4]).meta.kind == "full"
        assert read_entry(reader, table.entries[3]).parent == table.entries[2]
    finally:
        reader.close()
    del states["E1"]
    check_all(repo, states, tmp_path)


def test_rm_refuses_held_or_tagged_entries_without_force(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    states = chain(repo, area, 3)
    create_tag(repo, "good", "E2", None)
    before = refs_mod.read_refs(repo)
    with pytest.raises(UsageError, match="tag good"):
        rm(repo, ["E2"])
    with pytest.raises(UsageError, match="holds it"):
        rm(repo, ["E1", "E3"])  # E1 is free, E3 held: nothing happens at all
    assert refs_mod.read_refs(repo).entries == before.entries
    rm(repo, ["E3"], force=True)
    st = load_state(area)
    assert st is not None and st.entry == refs_mod.read_refs(repo).entries[2].hex()
    rm(repo, ["E2"], force=True)
    assert "good" not in refs_mod.read_refs(repo).tags
    check_all(repo, {"E1": states["E1"]}, tmp_path)


def test_names_and_areas_follow_rewritten_entries(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    states = chain(repo, area, 3)
    r = commit(repo, area, message="last")
    states[r.entry] = snapshot(area)
    create_tag(repo, "v1", "E3", None)
    create_branch(repo, "work", "E4", area)
    other = tmp_path / "other"
    checkout(repo, "E3", other)
    rm(repo, ["E2"])
    table = refs_mod.read_refs(repo)
    assert table.tags["v1"] == table.entries[3]
    assert table.branches["work"] == table.entries[4]
    st = load_state(area)
    assert st is not None and st.entry == table.entries[4].hex() and st.branch == "work"
    # Both areas are still clean: their caches follow the new commits.
    assert status(repo, area).clean
    assert status(repo, other).clean
    st2 = load_state(other)
    assert st2 is not None and st2.entry == table.entries[3].hex()
    # Saving again extends the rewritten chain.
    edit(area / "disk.img", 4096, b"x" * 10)
    r = commit(repo, area, message="after rm")
    states[r.entry] = snapshot(area)
    del states["E2"]
    check_all(repo, states, tmp_path)


def test_rm_in_a_chain_of_20_writes_no_image_data(repo: Repository, tmp_path: Path) -> None:
    area = tmp_path / "a20"
    make_area(area, disk=24 * BLOCK)
    rng = random.Random(9)
    states: dict[str, dict[str, str]] = {}
    for i in range(20):
        # Whole blocks of its own, and 4 KiB pages rewritten in a few shared
        # blocks: the removed entry's deltas and whole blocks sit under its
        # children's deltas, which once had to be rebuilt; now they are named.
        edit(area / "disk.img", i * BLOCK, rng.randbytes(BLOCK))
        for block in (21, 22, 23):
            edit(area / "disk.img", block * BLOCK + (i % 16) * 4096, rng.randbytes(4096))
        states[commit(repo, area, message=f"s{i}").entry] = snapshot(area)
    res = rm(repo, ["E10"])
    assert res.data_bytes == 0
    assert res.anchored_blocks > 0  # the case that used to need image data
    # Only metadata: manifests, block-map trees, entry metadata, commits for E11..E20.
    assert 0 < res.pack_bytes < 64 << 10
    del states["E10"]
    check_all(repo, states, tmp_path)


def test_interrupted_rm_is_finished_by_the_next_command(
    repo: Repository, area: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = chain(repo, area, 5)
    real = refs_mod.set_ref
    calls: list[int] = []

    def crash_on_second(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between two ref moves
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(refs_mod, "set_ref", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        rm(repo, ["E2"])
    monkeypatch.setattr(refs_mod, "set_ref", real)
    # E5 moved (deepest first), E3 and E4 did not: E5's parent is no entry.
    half = refs_mod.read_refs(repo)
    assert sorted(half.entries) == [1, 2, 3, 4, 5]
    moved = half.entries[5]
    # The next command finishes the removal before it reads anything.
    again = open_repository(repo.path)
    table = refs_mod.read_refs(again)
    assert sorted(table.entries) == [1, 3, 4, 5]
    assert table.entries[5] == moved  # the commit the interrupted run made
    assert load_state(area).entry == moved.hex()  # type: ignore[union-attr]
    del states["E2"]
    check_all(again, states, tmp_path / "done")
