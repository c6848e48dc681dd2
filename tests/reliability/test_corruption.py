"""A damaged repository: damaged entries are named, others still check out, nothing silently wrong.

E1 and E2 are saved from two different areas, so each has its own pack;
each test damages E2's data only (a flipped byte, a truncated pack, a
missing object, a missing ref) and checks that ``vml fsck``/``vml verify``
name E2, that E1 still checks out byte for byte, and that checking out E2
fails with exit code 7 without leaving any file whose content is wrong.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from dulwich.object_format import DEFAULT_OBJECT_FORMAT
from dulwich.pack import load_pack_index

from tests.conftest import digest_area
from tests.reliability.conftest import World
from tests.reliability.helpers import one_line_error
from tests.reliability.helpers import vml_in_process as vml
from vml.plumbing.packreader import parse_object_header


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


def _restream(pack: Path) -> None:
    """Replace a block's content with other bytes in a valid zlib stream.

    The stream inflates cleanly and its own Adler-32 matches, so only a check
    of the content itself (object id, or the entry's block checks) sees it.
    """
    index = load_pack_index(str(pack.with_suffix(".idx")), DEFAULT_OBJECT_FORMAT)
    data = bytearray(pack.read_bytes())
    for _sha, offset, _crc in index.iterentries():
        type_num, size, head = parse_object_header(bytes(data[offset : offset + 32]))
        if type_num != 3 or size != 64 << 10:
            continue
        old = zlib.decompressobj()
        content = old.decompress(bytes(data[offset + head :]))
        used = len(data) - offset - head - len(old.unused_data)
        changed = bytearray(content)
        changed[size // 2] ^= 0x5A
        for level in (0, 1, 6, 9):
            new = zlib.compress(bytes(changed), level)
            if len(new) <= used:
                break
        else:
            continue
        data[offset + head : offset + head + len(new)] = new
        os.chmod(pack, 0o644)
        pack.write_bytes(bytes(data))
        return
    raise AssertionError("no whole block found in the pack")


def _missing_object(pack: Path) -> None:
    repo = pack.parents[2]
    commit = (repo / "refs" / "vml" / "entries" / "2").read_text().strip()
    (repo / "objects" / commit[:2] / commit[2:]).unlink()


def _missing_pack(pack: Path) -> None:
    pack.unlink()
    pack.with_suffix(".idx").unlink()


@pytest.mark.parametrize(
    "damage",
    [_flip, _restream, _truncate, _missing_object, _missing_pack],
    ids=[
        "flipped-byte",
        "valid-stream-wrong-bytes",
        "truncated-pack",
        "missing-commit",
        "missing-pack",
    ],
)
def test_damage_is_named_and_contained(
    tmp_path: Path, world: World, damage: Callable[[Path], None]
) -> None:
    repo, a1, a2, pack2 = world
    damage(pack2)
    run = vml(repo, "verify", "--all", "--read-data")
    assert run.code != 0 and "E2" in run.out + run.err, run
    assert "E1" not in run.out + run.err, run
    # fsck reads no image, but compares every packed object with its index's CRC-32.
    run = vml(repo, "fsck")
    assert run.code == 7, run
    assert "entries affected: E2" in run.out, run
    run = vml(repo, "verify", "E1")  # only what E1 needs
    assert run.code == 0 and "E2" not in run.out + run.err, run
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


@pytest.mark.parametrize("damage", [_restream, _flip], ids=["valid-stream-wrong-bytes", "flipped"])
def test_a_damaged_copy_is_passed_over_when_another_pack_holds_the_object(
    tmp_path: Path, world: World, damage: Callable[[Path], None]
) -> None:
    """The same objects in two packs, one copy damaged: checkout still succeeds.

    Blocks are read without their ids checked (nor their streams'
    Adler-32): the block check, or a delta that no longer applies, sends
    the build back to the objects, read checked, which passes over the copy.
    """
    repo, _a1, a2, pack2 = world
    # A second copy of E2's pack, named so that readers try it first.
    copy = pack2.with_name("pack-" + "0" * 40 + ".pack")
    copy.write_bytes(pack2.read_bytes())
    copy.with_suffix(".idx").write_bytes(pack2.with_suffix(".idx").read_bytes())
    damage(copy)
    run = vml(repo, "checkout", "-q", "E2", tmp_path / "e2")
    assert run.code == 0, run
    assert digest_area(tmp_path / "e2") == digest_area(a2)
