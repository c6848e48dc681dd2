"""A damaged repository: damaged entries are named, others still check out, nothing silently wrong.

E1 and E2 are saved from two different areas, so each has its own pack;
each test damages E2's data only (a flipped byte, a truncated pack, a
missing object, a missing ref) and checks that ``vml fsck``/``vml verify``
name E2, that E1 still checks out byte for byte, and that checking out E2
fails with exit code 7 without leaving any file whose content is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import digest_area, make_area
from tests.reliability.helpers import one_line_error
from tests.reliability.helpers import vml_in_process as vml

World = tuple[Path, Path, Path, Path]  # repo, area of E1, area of E2, E2's pack


@pytest.fixture
def world(tmp_path: Path, cli_repo: Path) -> World:
    a1, a2 = tmp_path / "one", tmp_path / "two"
    make_area(a1, seed=1)
    make_area(a2, seed=2)
    (a2 / "vm.nvram").write_bytes(os.urandom(100 << 10))  # an image of its own
    packs = cli_repo / "objects" / "pack"
    assert vml(cli_repo, "commit", "-q", a1).code == 0
    before = set(packs.glob("*.pack"))
    assert vml(cli_repo, "commit", "-q", a2).code == 0
    (pack2,) = set(packs.glob("*.pack")) - before
    return cli_repo, a1, a2, pack2


def _flip(pack: Path) -> None:
    data = bytearray(pack.read_bytes())
    pos = len(data) // 3
    data[pos] ^= 0x5A
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))


def _truncate(pack: Path) -> None:
    os.chmod(pack, 0o644)
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size // 2)


def _missing_object(pack: Path) -> None:
    repo = pack.parents[2]
    commit = (repo / "refs" / "vml" / "entries" / "2").read_text().strip()
    (repo / "objects" / commit[:2] / commit[2:]).unlink()


def _missing_pack(pack: Path) -> None:
    pack.unlink()
    pack.with_suffix(".idx").unlink()


@pytest.mark.parametrize(
    "damage",
    [_flip, _truncate, _missing_object, _missing_pack],
    ids=["flipped-byte", "truncated-pack", "missing-commit", "missing-pack"],
)
def test_damage_is_named_and_contained(
    tmp_path: Path, world: World, damage: Callable[[Path], None]
) -> None:
    repo, a1, a2, pack2 = world
    damage(pack2)
    run = vml(repo, "verify", "--all", "--read-data")
    assert run.code != 0 and "E2" in run.out + run.err, run
    assert "E1" not in run.out + run.err, run
    if damage is not _flip:  # fsck checks structure and presence, not content
        run = vml(repo, "fsck")
        assert run.code != 0, run
        assert "E2" in run.out + run.err, run
    # E1 is untouched.
    assert vml(repo, "checkout", "-q", "E1", tmp_path / "e1").code == 0
    assert digest_area(tmp_path / "e1") == digest_area(a1)
    # E2 fails clearly and writes nothing wrong: every file there is E2's own.
    target = tmp_path / "e2"
    run = vml(repo, "checkout", "E2", target)
    assert run.code == 7, run
    one_line_error(run)
    want = digest_area(a2)
    for path, item in digest_area(target).items():
        assert want.get(path) == item, f"{path} was written with wrong content"


def test_a_missing_ref_loses_only_its_name(tmp_path: Path, world: World) -> None:
    repo, a1, _a2, _pack = world
    (repo / "refs" / "vml" / "entries" / "2").unlink()
    run = vml(repo, "checkout", "E2", tmp_path / "e2")
    assert run.code == 4 and "no entry named" in one_line_error(run)
    assert not (tmp_path / "e2").exists()
    assert vml(repo, "checkout", "-q", "E1", tmp_path / "e1").code == 0
    assert digest_area(tmp_path / "e1") == digest_area(a1)
