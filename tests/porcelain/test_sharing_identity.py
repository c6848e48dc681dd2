"""Sharing over plain paths: entry identity, numbering, branches, tags, partial fetch (#6)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, edit, make_area, three_entries
from vml.errors import UnknownEntry, UsageError, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing import remotes as remotes_mod
from vml.plumbing.repository import Repository, init_repository, open_repository
from vml.porcelain import clone as clone_mod
from vml.porcelain import fetch as fetch_mod
from vml.porcelain import log as log_mod
from vml.porcelain import names as names_mod
from vml.porcelain import pull as pull_mod
from vml.porcelain import push as push_mod
from vml.porcelain import remote as remote_mod
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit


def digest(area: Path) -> dict[str, str]:
    """sha256 of every file of an area (VML's own folder left out)."""
    return {
        str(p.relative_to(area)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(area.rglob("*"))
        if p.is_file() and ".vml" not in p.relative_to(area).parts
    }


def bare(path: Path) -> str:
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
    return str(path)


def fsck(path: Path) -> None:
    subprocess.run(
        ["git", "fsck", "--full", "--strict", "--no-progress"],
        cwd=path,
        check=True,
        capture_output=True,
    )


def numbers(repo: Repository) -> dict[str, int]:
    """commit hex -> local E-number."""
    return {c.hex(): n for n, c in refs_mod.read_refs(repo).entries.items()}


@pytest.fixture
def alice(tmp_path: Path) -> Repository:
    """A repository with a chain E1 (full) <- E2 and a differential E3 from E1."""
    r = three_entries(tmp_path / "alice", tmp_path / "a-area")
    return r


def test_each_side_keeps_its_numbers_and_the_forest(alice: Repository, tmp_path: Path) -> None:
    server = bare(tmp_path / "server.git")
    remote_mod.add(alice, "origin", server)
    pushed = push_mod.push(alice, all_entries=True)
    assert pushed.entries == ["E1", "E2", "E3"] and pushed.objects > 0

    cl = clone_mod.clone(server, tmp_path / "bob")
    assert cl.block_size == TEST_BLOCK
    bob = open_repository(tmp_path / "bob")
    assert numbers(bob) == numbers(alice)  # a clone keeps the numbers (it was empty)

    # both save "their E4" on top of E2
    a_area, b_area = tmp_path / "a4", tmp_path / "b4"
    checkout(alice, "E2", a_area)
    checkout(bob, "E2", b_area)
    edit(a_area / "disk.img", 10, b"alice" * 50)
    edit(b_area / "disk.img", 10, b"bob" * 50)
    a4 = commit(alice, a_area, message="alice's")
    b4 = commit(bob, b_area, message="bob's")
    assert a4.entry == b4.entry == "E4" and a4.commit != b4.commit

    push_mod.push(alice, names=["E4"])
    push_mod.push(bob, names=["E4"])
    fa = fetch_mod.fetch(alice)
    fb = fetch_mod.fetch(bob)
    assert [e.entry for e in fa.new_entries] == ["E5"]
    assert [e.entry for e in fb.new_entries] == ["E5"]
    assert numbers(alice)[b4.commit] == 5 and numbers(alice)[a4.commit] == 4
    assert numbers(bob)[a4.commit] == 5 and numbers(bob)[b4.commit] == 4

    # fetching again changes nothing: one commit never gets two numbers
    assert fetch_mod.fetch(alice).new_entries == []
    assert len(numbers(alice)) == len(refs_mod.read_refs(alice).entries) == 5

    # the forest is the same on both sides, seen through commit ids
    def forest(r: Repository) -> set[tuple[str, str | None]]:
        res = log_mod.log(r)
        by_id = {le.id: le.commit for le in res.entries.values()}
        return {(le.commit, by_id.get(le.parent or "")) for le in res.entries.values()}

    assert forest(alice) == forest(bob)
    # log says where the foreign entries came from
    la = log_mod.log(alice).entries
    assert la["E5"].remote == "origin" and la["E4"].remote == ""
    assert all(
        le.remote.startswith("origin") for le in log_mod.log(bob).entries.values() if le.id != "E4"
    )

    # every entry builds identically on both sides
    for n in range(1, 6):
        c = refs_mod.read_refs(alice).entries[n]
        m = numbers(bob)[c.hex()]
        checkout(alice, f"E{n}", tmp_path / f"ca{n}")
        checkout(bob, f"E{m}", tmp_path / f"cb{n}")
        assert digest(tmp_path / f"ca{n}") == digest(tmp_path / f"cb{n}")
    for p in (alice.path, bob.path, Path(server)):
        fsck(p)
    bob.close()


def test_push_never_touches_remote_numbers(alice: Repository, tmp_path: Path) -> None:
    # the remote is itself someone's VML repository
    carol = init_repository(tmp_path / "carol", TEST_BLOCK)
    c_area = tmp_path / "c-area"
    make_area(c_area, seed=7)
    commit(carol, c_area, message="carol's E1")
    before = numbers(carol)
    carol.close()
    remote_mod.add(alice, "carol", str(tmp_path / "carol"))
    push_mod.push(alice, "carol", ["E3"])
    carol = open_repository(tmp_path / "carol")
    assert numbers(carol) == before  # E-numbers untouched; entries wait as shared refs
    shared = [r for r in carol.git.refs.allkeys() if r.startswith(remotes_mod.SHARED_PREFIX)]
    assert len(shared) == 2  # E3 and its parent E1
    # carol's next fetch (even with no remote configured) numbers them
    res = fetch_mod.fetch(carol)
    assert [e.entry for e in res.new_entries] == ["E2", "E3"]
    checkout(carol, "E3", tmp_path / "c3")
    checkout(alice, "E3", tmp_path / "a3")
    assert digest(tmp_path / "c3") == digest(tmp_path / "a3")
    carol.close()


def test_fetch_one_entry_brings_only_its_chain(alice: Repository, tmp_path: Path) -> None:
    # serve alice's own repository: the remote names entries E1..E3
    bob = init_repository(tmp_path / "bob", TEST_BLOCK)
    remote_mod.add(bob, "alice", str(alice.path))
    res = fetch_mod.fetch(bob, "alice", ["E2"])
    assert [(e.entry, e.remote_entry) for e in res.new_entries] == [("E1", "E1"), ("E2", "E2")]
    table = refs_mod.read_refs(alice)
    assert not bob.git.object_store.contains_loose(table.entries[3].hex().encode())
    assert table.entries[3].hex().encode() not in bob.git.object_store
    checkout(bob, "E2", tmp_path / "b2")
    checkout(alice, "E2", tmp_path / "a2")
    assert digest(tmp_path / "b2") == digest(tmp_path / "a2")
    assert log_mod.log(bob).entries["E2"].remote == "alice E2"
    # then the rest
    res = fetch_mod.fetch(bob, "alice")
    assert [(e.entry, e.remote_entry) for e in res.new_entries] == [("E3", "E3")]
    with pytest.raises(UnknownEntry):
        fetch_mod.fetch(bob, "alice", ["E9"])
    fsck(bob.path)
    bob.close()


def test_branches_tags_pull_and_rejected_push(alice: Repository, tmp_path: Path) -> None:
    server = bare(tmp_path / "server.git")
    names_mod.create_branch(alice, "main", "E2", tmp_path / "nowhere")
    names_mod.create_tag(alice, "golden", "E1", tmp_path / "nowhere")
    remote_mod.add(alice, "origin", server)
    res = push_mod.push(alice, names=["main", "golden"])
    assert res.branches == {"main": "E2"} and res.tags == ["golden"]
    cl = clone_mod.clone(server, tmp_path / "bob")
    assert cl.branches == ["main"]
    bob = open_repository(tmp_path / "bob")
    t = refs_mod.read_refs(bob)
    assert t.branches["main"] == refs_mod.read_refs(alice).branches["main"]
    assert t.tags["golden"] == refs_mod.read_refs(alice).tags["golden"]

    # bob moves main forward and pushes the branch back
    area = tmp_path / "b-main"
    checkout(bob, "main", area)
    edit(area / "disk.img", 900_000, b"z" * 3000)
    made = commit(bob, area, message="on main")
    assert made.branch == "main"
    push_mod.push(bob, names=["main"])
    # alice pulls: a fast-forward of her main
    pr = pull_mod.pull(alice)
    assert pr.moved == {"main": f"E{numbers(alice)[made.commit]}"}
    assert refs_mod.read_refs(alice).branches["main"].hex() == made.commit

    # alice moves main differently: her push is refused, nothing changes remotely
    a_area = tmp_path / "a-main"
    checkout(alice, "E2", a_area)
    edit(a_area / "disk.img", 5, b"q" * 100)
    own = commit(alice, a_area, message="mine")
    names_mod.delete_name(alice, "branch", "main")
    names_mod.create_branch(alice, "main", own.entry, tmp_path / "nowhere")
    before = remotes_mod.ls_remote(*remotes_mod.open_transport(None, server))
    with pytest.raises(VMLError, match="pull"):
        push_mod.push(alice, names=["main"])
    assert remotes_mod.ls_remote(*remotes_mod.open_transport(None, server)) == before
    # bob's pull sees alice's branch as diverged only after she forces it
    push_mod.push(alice, names=["main"], force=True)
    pb = pull_mod.pull(bob)
    assert pb.diverged == {"main": f"E{numbers(bob)[own.commit]}"}
    assert refs_mod.read_refs(bob).branches["main"].hex() == made.commit
    # a tag that differs remotely is kept as it is here
    names_mod.delete_name(bob, "tag", "golden")
    names_mod.create_tag(bob, "golden", "E2", tmp_path / "nowhere")
    assert fetch_mod.fetch(bob).tag_conflicts == ["golden"]
    with pytest.raises(VMLError):
        push_mod.push(bob, names=["golden"])
    bob.close()


def test_remote_config_and_errors(alice: Repository, tmp_path: Path) -> None:
    assert remote_mod.list_remotes(alice) == []
    with pytest.raises(UsageError):
        remote_mod.add(alice, "bad/name", "x")
    info = remote_mod.add(alice, "origin", str(tmp_path / "missing"))
    assert info.url == str(tmp_path / "missing")
    with pytest.raises(UsageError):
        remote_mod.add(alice, "origin", "elsewhere")
    # git sees the same remote (and fetch refspecs that fill the same refs)
    out = subprocess.run(
        ["git", "config", "--get-all", "remote.origin.fetch"],
        cwd=alice.path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "refs/vml/shared/*:refs/vml/remotes/origin/shared/*" in out
    with pytest.raises(VMLError, match="missing"):
        fetch_mod.fetch(alice)
    with pytest.raises(UsageError, match="nothing to push"):
        push_mod.push(alice)
    with pytest.raises(UsageError):
        push_mod.push(alice, "nope", ["E1"])
    remote_mod.remove(alice, "origin")
    assert remote_mod.list_remotes(alice) == []
    with pytest.raises(UsageError):
        remote_mod.remove(alice, "origin")


def test_failed_clone_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(VMLError):
        clone_mod.clone(str(tmp_path / "no-such-repo"), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(VMLError):
        clone_mod.clone(str(tmp_path / "no-such-repo"), tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    assert clone_mod.default_path("ssh://host/srv/lab-vms.git") == Path("lab-vms")


def test_a_failed_clone_removes_only_what_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another program writes into the new folder while the clone fetches
    # (an editor, a second command given the same folder): its file stays.
    dest = tmp_path / "dest"

    def fetch_fails(*_a: object, **_k: object) -> None:
        (dest / "notes.txt").write_text("not the clone's\n")
        raise VMLError("the transfer broke")

    monkeypatch.setattr(clone_mod, "fetch_into", fetch_fails)
    with pytest.raises(VMLError):
        clone_mod.clone(str(tmp_path / "src"), dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
