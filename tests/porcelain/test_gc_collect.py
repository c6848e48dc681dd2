"""``vml gc``: reclaims exactly the objects no ref reaches, streaming, safely."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from tests.conftest import edit
from tests.porcelain.test_forest_rm import BLOCK, check_all, snapshot
from vml.plumbing import refs as refs_mod
from vml.plumbing.packreader import blob_id
from vml.plumbing.repository import Repository
from vml.porcelain.commit import commit
from vml.porcelain.gc import gc
from vml.porcelain.rm import rm


def git(repo: Repository, *args: str, input_file: Path | None = None) -> str:
    stdin = open(input_file, "rb") if input_file is not None else None  # noqa: SIM115
    try:
        return subprocess.run(
            ["git", *args], cwd=repo.path, capture_output=True, check=True, stdin=stdin
        ).stdout.decode()
    finally:
        if stdin is not None:
            stdin.close()


def all_objects(repo: Repository) -> set[str]:
    out = git(repo, "cat-file", "--batch-all-objects", "--batch-check=%(objectname)")
    return set(out.split())


def reachable(repo: Repository) -> set[str]:
    out = git(repo, "rev-list", "--objects", "--all")
    return {line.split()[0] for line in out.splitlines() if line}


def test_gc_after_rm_frees_only_unused_blocks(repo: Repository, area: Path, tmp_path: Path) -> None:
    rng = random.Random(2)
    states = {commit(repo, area, message="base").entry: snapshot(area)}
    doomed = rng.randbytes(BLOCK)
    edit(area / "disk.img", 3 * BLOCK, doomed)
    states[commit(repo, area, message="doomed block").entry] = snapshot(area)
    edit(area / "disk.img", 3 * BLOCK, rng.randbytes(BLOCK))
    states[commit(repo, area, message="overwrites it").entry] = snapshot(area)
    assert blob_id(doomed).hex() in all_objects(repo)
    # Nothing unreachable yet: gc keeps everything.
    first = gc(repo)
    assert first.dead_objects == 0 and first.freed_bytes == 0

    rm(repo, ["E2"])
    dry = gc(repo, dry_run=True)
    assert dry.dead_objects > 0 and blob_id(doomed).hex() in all_objects(repo)
    res = gc(repo)
    assert not res.deferred
    assert res.freed_bytes >= BLOCK // 2  # the random block, compressed, at least
    objects = all_objects(repo)
    assert blob_id(doomed).hex() not in objects
    assert objects == reachable(repo)  # only unreachable objects went, all of them
    del states["E2"]
    check_all(repo, states, tmp_path)
    again = gc(repo)
    assert again.dead_objects == 0 and again.written_bytes == 0


def test_gc_keeps_what_a_concurrent_save_reuses(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    rng = random.Random(3)
    states = {commit(repo, area, message="base").entry: snapshot(area)}
    old = (area / "disk.img").read_bytes()[3 * BLOCK : 4 * BLOCK]
    reused = rng.randbytes(BLOCK)
    edit(area / "disk.img", 3 * BLOCK, reused)
    commit(repo, area, message="to be removed")
    edit(area / "disk.img", 3 * BLOCK, old)
    states[commit(repo, area, message="back").entry] = snapshot(area)
    rm(repo, ["E2"])
    fired = []

    def during(phase: str, done: int, total: int) -> None:
        # While gc copies (without the lock), a save stores the dead block's
        # content again: it finds the block in an old pack and does not copy it.
        if phase == "copy" and not fired:
            fired.append(1)
            edit(area / "disk.img", 3 * BLOCK, reused)
            states[commit(repo, area, message="again").entry] = snapshot(area)

    res = gc(repo, progress=during)
    assert fired and not res.deferred
    # The block lay only in a pack gc deletes: it was copied under the lock.
    packed = "".join(
        git(repo, "show-index", input_file=repo.objects_dir / "pack" / f"{p}.idx")
        for p in res.new_packs
    )
    assert blob_id(reused).hex() in packed
    assert blob_id(reused).hex() in all_objects(repo)
    check_all(repo, states, tmp_path)


def test_gc_defers_deleting_while_a_save_writes(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    states = {commit(repo, area, message="base").entry: snapshot(area)}
    edit(area / "disk.img", 0, os.urandom(BLOCK))
    commit(repo, area)
    edit(area / "disk.img", 0, os.urandom(BLOCK))
    states[commit(repo, area).entry] = snapshot(area)
    rm(repo, ["E2"])
    before = all_objects(repo)
    # Another live process (our parent) seems to be writing a pack.
    tmp = repo.objects_dir / "pack" / f"tmp_vml_{os.getppid()}_1_2.pack"
    tmp.write_bytes(b"PACK")
    try:
        res = gc(repo)
    finally:
        tmp.unlink()
    assert res.deferred
    assert before <= all_objects(repo)
    res = gc(repo)
    assert not res.deferred and res.freed_bytes > 0
    assert all_objects(repo) == reachable(repo)
    check_all(repo, states, tmp_path)
    assert sorted(refs_mod.read_refs(repo).entries) == [1, 3]
