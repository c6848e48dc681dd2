"""``vml prune``: retention keeps held, tagged and branch entries, removes the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.porcelain.test_forest_rm import chain, check_all
from vml.errors import UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.repository import Repository
from vml.plumbing.retention import Policy
from vml.porcelain.gc import gc
from vml.porcelain.names import create_branch, create_tag
from vml.porcelain.prune import prune


def test_prune_keeps_last_and_protected(repo: Repository, area: Path, tmp_path: Path) -> None:
    states = chain(repo, area, 8)
    create_tag(repo, "paper", "E2", None)
    create_branch(repo, "old", "E4", None, follow=False)
    dry = prune(repo, Policy(last=2), dry_run=True)
    assert [d.entry for d in dry.remove] == ["E1", "E3", "E5", "E6"]
    assert sorted(refs_mod.read_refs(repo).entries) == list(range(1, 9))  # nothing changed
    why = {d.entry: d.reasons for d in dry.keep}
    assert why["E2"] == ["tag paper"] and why["E4"] == ["branch old"]
    assert "last" in why["E7"] and any(r.startswith("area") for r in why["E8"])
    res = prune(repo, Policy(last=2))
    assert res.rm is not None and sorted(res.rm.removed) == ["E1", "E3", "E5", "E6"]
    assert sorted(refs_mod.read_refs(repo).entries) == [2, 4, 7, 8]
    gc(repo)
    check_all(repo, {k: v for k, v in states.items() if k in ("E2", "E4", "E7", "E8")}, tmp_path)


def test_prune_needs_a_policy(repo: Repository, area: Path) -> None:
    chain(repo, area, 2)
    with pytest.raises(UsageError, match="no retention policy"):
        prune(repo, Policy())
    with pytest.raises(UsageError, match="no tag named"):
        prune(repo, Policy(), keep_tags=["nope"])
