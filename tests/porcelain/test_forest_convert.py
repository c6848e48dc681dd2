"""``vml convert``: the same content against another parent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import edit
from tests.porcelain.test_forest_rm import chain, check_all, snapshot
from vml.errors import UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.chains import read_entry
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.porcelain.commit import commit
from vml.porcelain.convert import convert
from vml.porcelain.names import create_tag


def parent_of(repo: Repository, n: int) -> int | None:
    table = refs_mod.read_refs(repo)
    reader = PackReader(repo)
    try:
        p = read_entry(reader, table.entries[n]).parent
    finally:
        reader.close()
    return table.number_of(p) if p is not None else None


def test_convert_tip_of_a_chain(repo: Repository, area: Path, tmp_path: Path) -> None:
    states = chain(repo, area, 12)
    edit(area / "disk.img", 0, b"child")
    states[commit(repo, area, message="child of the tip").entry] = snapshot(area)
    create_tag(repo, "tip", "E12", None)
    res = convert(repo, "E12", "differential")
    assert res.changed and res.parent == "E1" and res.old_parent == "E11"
    assert parent_of(repo, 12) == 1 and parent_of(repo, 13) == 12
    table = refs_mod.read_refs(repo)
    assert table.tags["tip"] == table.entries[12]
    check_all(repo, states, tmp_path)
    res = convert(repo, "tip", "full")
    assert parent_of(repo, 12) is None and res.old_kind == "differential"
    check_all(repo, states, tmp_path)
    res = convert(repo, "E12", "incremental")
    assert res.parent == "E11"
    check_all(repo, states, tmp_path)
    res = convert(repo, "E12", "differential", base="E5")
    assert parent_of(repo, 12) == 5
    assert not convert(repo, "E12", "differential", base="E5").changed
    check_all(repo, states, tmp_path)


def test_convert_refuses_cycles_and_bad_kinds(repo: Repository, area: Path) -> None:
    chain(repo, area, 3)
    with pytest.raises(UsageError, match="depends on"):
        convert(repo, "E1", "differential", base="E3")
    with pytest.raises(UsageError, match="root of its chain"):
        convert(repo, "E1", "differential")
    with pytest.raises(UsageError, match="unknown entry kind"):
        convert(repo, "E2", "partial")
    with pytest.raises(UsageError, match="no entry was saved before"):
        convert(repo, "E1", "incremental")
