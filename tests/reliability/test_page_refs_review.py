"""Review of page references (#12): data loss and hostile input (reviewer's tests).

Each test names the invariant it checks; see the review report for causes.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import digest_area
from tests.reliability.helpers import vml_in_process as vml
from tests.reliability.test_page_references import PAGE, _area, _git_fsck, _ram_layer, _session


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
