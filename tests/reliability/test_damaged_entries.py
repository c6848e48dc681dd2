"""One damaged entry stays local: read commands name it and go on; rm --force drops it.

Area A holds E1 <- E2 <- E3 (incremental saves), area B holds E4 (full).
An entry is damaged by deleting its commit object, or by pointing its ref at
a blob or a tree.  Every read command (log, log --graph, log --json, show,
status, areas, verify, fsck) must name the damaged entry, report it only
where it matters (``verify E1`` is about E1 and what E1 is built on), and
go on with the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from dulwich.objects import Blob, Tree
from dulwich.repo import Repo

from tests.conftest import digest_area, edit, make_area
from tests.reliability.helpers import git_fsck, one_line_error
from tests.reliability.helpers import vml_in_process as vml

Forest = tuple[Path, Path, Path]  # repo, area A (holds E3), area B (holds E4)


@pytest.fixture
def forest(tmp_path: Path, cli_repo: Path) -> Forest:
    a, b = tmp_path / "a", tmp_path / "b"
    make_area(a, seed=1)
    make_area(b, seed=2)
    assert vml(cli_repo, "commit", "-q", a).code == 0
    edit(a / "disk.img", 300_000, b"x" * 5000)
    assert vml(cli_repo, "commit", "-q", a).code == 0
    edit(a / "disk.img", 600_000, b"y" * 7000)
    assert vml(cli_repo, "commit", "-q", a).code == 0
    assert vml(cli_repo, "commit", "-q", b).code == 0
    return cli_repo, a, b


def _commit_of(repo: Path, n: int) -> str:
    return (repo / "refs" / "vml" / "entries" / str(n)).read_text().strip()


def _missing_commit(repo: Path, n: int) -> None:
    c = _commit_of(repo, n)
    (repo / "objects" / c[:2] / c[2:]).unlink()


def _ref_to(make: Callable[[], Blob | Tree]) -> Callable[[Path, int], None]:
    def damage(repo: Path, n: int) -> None:
        git = Repo(str(repo))
        obj = make()
        git.object_store.add_object(obj)
        git.refs[f"refs/vml/entries/{n}".encode()] = obj.id
        git.close()

    return damage


DAMAGE = [
    _missing_commit,
    _ref_to(lambda: Blob.from_string(b"not a commit")),
    _ref_to(Tree),
]
IDS = ["missing-commit", "ref-to-a-blob", "ref-to-a-tree"]


@pytest.mark.parametrize("damage", DAMAGE, ids=IDS)
def test_every_read_command_names_a_damaged_entry_and_goes_on(
    tmp_path: Path, forest: Forest, damage: Callable[[Path, int], None]
) -> None:
    repo, a, b = forest
    damage(repo, 3)  # the entry area A holds
    for args in (["log"], ["log", "--graph"], ["log", "--all"]):
        run = vml(repo, *args)
        assert run.code == 0 and "Traceback" not in run.err, (args, run)
        assert "E3" in run.out and "damaged" in run.out and "E4" in run.out, (args, run.out)
    logged = {e["id"]: e for e in json.loads(vml(repo, "log", "--json").out)}
    assert set(logged) == {"E1", "E2", "E3", "E4"}
    assert logged["E3"]["damage"] and logged["E3"]["kind"] == "damaged"
    assert logged["E2"]["damage"] is None and logged["E2"]["kind"] == "incremental"

    assert vml(repo, "show", "E2").code == 0
    run = vml(repo, "show", "E3")
    assert run.code == 7 and "entry E3 is damaged" in one_line_error(run)

    if damage is _missing_commit:  # (a ref moved to a non-commit: A holds no entry any more)
        run = vml(repo, "status", a)
        assert run.code == 0 and "damaged" in run.out, run
        status = json.loads(vml(repo, "status", "--json", a).out)
        assert status["damage"] and status["clean"] is False
        areas = {x["path"]: x for x in json.loads(vml(repo, "areas", "--json").out)}
        assert areas[str(a)]["damage"] and areas[str(b)]["dirty"] is False
    run = vml(repo, "status", b)
    assert run.code == 0 and "nothing changed" in run.out, run

    for name in ("E1", "E2", "E4"):  # nothing E3 holds is theirs
        run = vml(repo, "verify", name)
        assert run.code == 0 and "E3" not in run.out + run.err, (name, run)
    for args in (["verify", "--all"], ["fsck"]):
        run = vml(repo, *args)
        assert run.code == 7 and "entries affected: E3" in run.out, (args, run)
    assert vml(repo, "checkout", "-q", "E4", tmp_path / "e4").code == 0
    assert digest_area(tmp_path / "e4") == digest_area(b)


def test_damage_inside_a_chain_is_traced_to_what_is_built_on_it(forest: Forest) -> None:
    repo, _a, _b = forest
    _missing_commit(repo, 2)
    run = vml(repo, "log", "--graph", "--all")
    assert run.code == 0, run
    lines = run.out.splitlines()
    e2 = next(i for i, ln in enumerate(lines) if ln.lstrip("│ ├└─").startswith("E2"))
    assert "damaged" in lines[e2] and "E3" in lines[e2 + 1], run.out  # E3 drawn below E2
    run = vml(repo, "show", "E3")
    assert run.code == 0 and "E2 (damaged" in run.out, run
    run = vml(repo, "verify", "E3")  # E3 is built on E2
    assert run.code == 7 and "entries affected: E2, E3" in run.out, run
    assert vml(repo, "verify", "E1").code == 0
    run = vml(repo, "fsck")
    assert run.code == 7 and "entries affected: E2, E3" in run.out, run


def test_rm_force_drops_a_damaged_entry_and_leaves_its_children(forest: Forest) -> None:
    repo, a, _b = forest
    e3 = _commit_of(repo, 3)
    _missing_commit(repo, 2)
    run = vml(repo, "rm", "E2")
    error = one_line_error(run)
    assert run.code == 2 and "damaged" in error and "E3" in error, run
    run = vml(repo, "rm", "--force", "E2")
    assert run.code == 0 and "left as they were: E3" in run.out, run
    assert not (repo / "refs" / "vml" / "entries" / "2").exists()
    assert _commit_of(repo, 3) == e3  # E3 is not rewritten: it cannot be
    logged = {e["id"] for e in json.loads(vml(repo, "log", "--json").out)}
    assert logged == {"E1", "E3", "E4"}
    run = vml(repo, "fsck")
    assert run.code == 7 and "entries affected: E3" in run.out, run
    # E3, damaged too, goes the same way (area A holds it: --force).
    assert vml(repo, "rm", "--force", "E3").code == 0
    assert vml(repo, "fsck").code == 0
    assert vml(repo, "gc").code == 0
    git_fsck(repo)
    assert json.loads(vml(repo, "status", "--json", a).out)["entry"] is None


@pytest.mark.parametrize("damage", DAMAGE[1:], ids=IDS[1:])
def test_rm_drops_an_entry_ref_to_a_non_commit(
    forest: Forest, damage: Callable[[Path, int], None]
) -> None:
    repo, _a, _b = forest
    damage(repo, 9)
    assert vml(repo, "fsck").code == 7
    run = vml(repo, "rm", "E9")  # nothing holds it, nothing is built on it
    assert run.code == 0, run
    assert vml(repo, "fsck").code == 0
