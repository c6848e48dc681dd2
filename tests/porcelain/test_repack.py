"""Pack consolidation: saves and gc keep the number of packs small, losing nothing."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import edit
from tests.porcelain.test_forest_rm import BLOCK, check_all, snapshot
from tests.porcelain.test_gc_collect import all_objects
from vml.errors import RepositoryBusy
from vml.plumbing.repack import maintenance, pack_count, rollup
from vml.plumbing.repository import Repository, open_repository
from vml.porcelain.commit import CommitResult, commit
from vml.porcelain.gc import gc


def test_rollup_follows_gits_geometric_rule() -> None:
    assert rollup([]) == 0
    assert rollup([10]) == 0
    assert rollup([45, 480]) == 0  # already a progression
    assert rollup([45, 45, 480]) == 2  # two equal small packs: merged
    assert rollup([45, 90, 480]) == 0
    # The two 45s merge into 90, which no longer fits under the next 90: absorbed too.
    assert rollup([45, 45, 90, 480]) == 3
    assert rollup([1, 1, 1, 1]) == 4
    assert rollup([1, 2, 4, 8, 16]) == 0


def _config(repo: Repository, key: str, value: str) -> Repository:
    subprocess.run(["git", "config", key, value], cwd=repo.path, check=True)
    path = repo.path
    repo.close()
    return open_repository(path)


def _sessions(
    repo: Repository, area: Path, n: int, seed: int = 3
) -> tuple[dict[str, dict[str, str]], list[CommitResult]]:
    """A first save, then ``n`` small sessions, each saved (a pack each)."""
    rng = random.Random(seed)
    states: dict[str, dict[str, str]] = {}
    results = [commit(repo, area, message="base")]
    states[results[0].entry] = snapshot(area)
    for i in range(n):
        edit(area / "disk.img", (i % 8) * BLOCK + 4096 * i, rng.randbytes(BLOCK // 2))
        results.append(commit(repo, area, message=f"session {i}"))
        states[results[-1].entry] = snapshot(area)
    return states, results


def test_a_save_past_the_limit_rolls_small_packs_up(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    repo = _config(repo, "vml.autoPackLimit", "4")
    states, results = _sessions(repo, area, 8)
    repacked = [r for r in results if r.repacked is not None]
    assert repacked, "no save consolidated"
    for r in repacked:
        assert r.repacked is not None and len(r.repacked.merged) >= 2
        assert r.repack_problem is None
    assert pack_count(repo) <= 4 + 1
    # Nothing was lost: every object is still there, every entry rebuilds.
    before = all_objects(repo)
    check_all(repo, states, tmp_path)
    assert all_objects(repo) == before
    repo.close()


def test_gc_rolls_small_packs_up_and_keeps_every_object(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    repo = _config(repo, "vml.autoPackLimit", "0")  # saves never consolidate
    states, results = _sessions(repo, area, 6)
    assert all(r.repacked is None for r in results)
    packs = pack_count(repo)
    assert packs >= 7
    objects = all_objects(repo)
    res = gc(repo)
    assert res.repacked is not None
    assert res.repacked.packs_before == packs
    assert len(res.repacked.new_packs) == 1  # one pack, not parts: the progression holds
    assert pack_count(repo) == res.repacked.packs_after < packs
    assert all_objects(repo) == objects
    check_all(repo, states, tmp_path)
    # Already geometric: a second gc has nothing to roll up.
    assert gc(repo).repacked is None
    repo.close()


def test_packs_under_a_keep_file_are_never_merged(repo: Repository, area: Path) -> None:
    repo = _config(repo, "vml.autoPackLimit", "0")
    _sessions(repo, area, 4)
    pack_dir = repo.objects_dir / "pack"
    kept = sorted(pack_dir.glob("pack-*.pack"))[0]
    kept.with_suffix(".keep").write_text("mine\n")
    res = gc(repo)
    assert res.repacked is not None and kept.stem not in res.repacked.merged
    assert kept.exists() and kept.with_suffix(".idx").exists()
    repo.close()


def test_a_save_leaves_consolidation_to_a_running_gc(repo: Repository, area: Path) -> None:
    repo = _config(repo, "vml.autoPackLimit", "0")
    _sessions(repo, area, 3)  # similar small packs: not a progression
    repo = _config(repo, "vml.autoPackLimit", "1")
    packs = pack_count(repo)
    with maintenance(repo):  # as a gc running in another process would
        edit(area / "disk.img", 0, b"held" * 1000)
        res = commit(repo, area)
        assert res.repacked is None and res.repack_problem is None  # saved, nothing merged
        assert pack_count(repo) == packs + 1
        with pytest.raises(RepositoryBusy):
            gc(repo)  # one gc or consolidation at a time
    assert gc(repo).repacked is not None
    repo.close()


def test_gc_removes_a_pack_left_without_its_index(repo: Repository, area: Path) -> None:
    """What a consolidation killed between deleting an index and its pack leaves."""
    _sessions(repo, area, 1)
    pack_dir = repo.objects_dir / "pack"
    some = sorted(pack_dir.glob("pack-*.pack"))[0]
    orphan = pack_dir / ("pack-" + "1" * 40 + ".pack")
    orphan.write_bytes(some.read_bytes())
    writing = pack_dir / ("pack-" + "2" * 40 + ".pack")  # a live writer's, before its index
    writing.write_bytes(some.read_bytes())
    writing.with_suffix(".keep").write_text(f"vml-pending {os.getpid()}\n")
    res = gc(repo)
    assert not orphan.exists() and res.deleted_bytes >= some.stat().st_size
    assert writing.exists()
    repo.close()


def test_gc_removes_what_a_writer_killed_before_its_index_leaves(
    repo: Repository, area: Path
) -> None:
    """A temporary index and a lone pending marker of a dead process go; a live one's stay."""
    _sessions(repo, area, 1)
    pack_dir = repo.objects_dir / "pack"
    gone = 2**22 + 12345  # no such process (above the default pid_max)
    stale_idx = pack_dir / f"tmp_vml_{gone}_1_2_0.idx"
    stale_idx.write_bytes(b"partial index")
    stale_keep = pack_dir / ("pack-" + "3" * 40 + ".keep")
    stale_keep.write_text(f"vml-pending {gone}\n")
    live_keep = pack_dir / ("pack-" + "4" * 40 + ".keep")
    live_keep.write_text(f"vml-pending {os.getpid()}\n")
    gc(repo)
    assert not stale_idx.exists() and not stale_keep.exists()
    assert live_keep.exists()
    repo.close()
