"""A damaged area cache costs a rescan, never a wrong entry.

The cache vouches for what a save does not read: an unchanged image's
digest (``index.json``) and the blob id of every unchanged block (the block
records).  Bytes flipped in either used to go into the next entry's
manifest and block checks, found only by ``verify --read-data``.  Now the
index and each records file carry a checksum: damage is said once, the
files are read again, and the entry verifies clean.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import digest_area, edit, make_area
from tests.reliability.helpers import vml_in_process as vml


@pytest.fixture
def saved(tmp_path: Path, cli_repo: Path) -> tuple[Path, Path]:
    area = tmp_path / "area"
    make_area(area, disk=1 << 20)
    assert vml(cli_repo, "commit", "-q", area).code == 0
    return cli_repo, area


def _index(area: Path) -> Path:
    return area / ".vml" / "cache" / "index.json"


def _records_of(area: Path, rel: str) -> Path:
    doc = json.loads(_index(area).read_text())
    return area / ".vml" / "cache" / doc["files"][rel]["pages"]


def _commit_verifies_clean(repo: Path, area: Path, tmp_path: Path) -> None:
    run = vml(repo, "commit", "-q", area)
    assert run.code == 0, run
    assert run.err.count("area cache") == 1 and "damaged" in run.err, run.err  # said once
    assert vml(repo, "verify", "--read-data", "E2").code == 0
    assert vml(repo, "checkout", "-q", "E2", tmp_path / "copy").code == 0
    assert digest_area(tmp_path / "copy") == digest_area(area)


def test_flipped_block_records_cost_a_rescan(saved: tuple[Path, Path], tmp_path: Path) -> None:
    repo, area = saved
    records = _records_of(area, "disk.img")
    data = bytearray(records.read_bytes())
    data[3] ^= 0x01  # the blob id of block 0, which stays unchanged
    data[len(data) // 2] ^= 0x10
    records.write_bytes(bytes(data))
    edit(area / "disk.img", 5 * (64 << 10) + 100, b"changed")  # the image is read again
    _commit_verifies_clean(repo, area, tmp_path)


def test_a_records_file_without_its_checksum_is_not_trusted(
    saved: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, area = saved
    records = _records_of(area, "disk.img")
    records.with_name(records.name + ".sum").unlink()
    records.write_bytes(bytes(len(records.read_bytes())))  # every record zeroed
    edit(area / "disk.img", 100, b"changed")
    _commit_verifies_clean(repo, area, tmp_path)


@pytest.mark.parametrize("how", ["garbled-digest", "truncated"])
def test_a_damaged_cache_index_costs_a_rescan(
    saved: tuple[Path, Path], tmp_path: Path, how: str
) -> None:
    repo, area = saved
    index = _index(area)
    if how == "garbled-digest":
        # Still valid JSON: the unchanged image's digest would go into E2 as it is.
        doc = json.loads(index.read_text())
        doc["files"]["disk.img"]["sha256"] = "0" * 64
        index.write_text(json.dumps(doc))
    else:
        index.write_bytes(index.read_bytes()[:50])
    (area / "vm.vmx").write_text('displayName = "renamed"\n')  # only a small file changes
    run = vml(repo, "status", area)
    assert run.code == 0 and "vm.vmx" in run.out and "area cache" in run.err, run
    _commit_verifies_clean(repo, area, tmp_path)
    # The new cache is whole again: the next save trusts it, silently.
    (area / "vm.vmx").write_text('displayName = "again"\n')
    run = vml(repo, "commit", "-q", area)
    assert run.code == 0 and "area cache" not in run.err, run
