"""Refs: entry numbers, tags, branches, name resolution, atomic moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.plumbing.entry_kit import save
from vml.errors import AmbiguousEntry, UnknownEntry, UsageError
from vml.plumbing import refs
from vml.plumbing.repository import Repository


def test_resolution(repo: Repository, area: Path) -> None:
    e1 = save(repo, area)
    (area / "vm.vmx").write_text("changed\n")
    e2 = save(repo, area, tag="good")
    c1, c2 = bytes.fromhex(e1.commit), bytes.fromhex(e2.commit)
    refs.set_ref(repo, refs.BRANCH_PREFIX + b"main", c1)
    t = refs.read_refs(repo)
    assert t.entries == {1: c1, 2: c2}
    assert t.tags == {"good": c2} and t.branches == {"main": c1}
    assert t.number_of(c2) == 2 and t.numbers() == {c1: 1, c2: 2}
    assert t.labels() == {c2: ["tag:good"], c1: ["main"]}
    for name, want in [
        ("E1", c1),
        ("e2", c2),
        ("2", c2),
        (" E1 ", c1),
        ("good", c2),
        ("main", c1),
        (e1.commit, c1),
        (e2.commit[:8], c2),
        (e2.commit[:8].upper(), c2),
    ]:
        assert refs.resolve_name(repo, name) == want, name
    for bad in ("E3", "nothing", "abc", "0000000"):
        with pytest.raises(UnknownEntry):
            refs.resolve_name(repo, bad)
    assert refs.next_number(repo, t.entries) == 3


def test_ambiguous_prefix(repo: Repository) -> None:
    a = bytes.fromhex("abcd01" + "00" * 17)
    b = bytes.fromhex("abcd02" + "00" * 17)
    table = refs.RefTable({1: a, 2: b}, {}, {})
    with pytest.raises(AmbiguousEntry):
        refs.resolve_name(repo, "abcd", table)
    assert refs.resolve_name(repo, "abcd01", table) == a
    with pytest.raises(UnknownEntry):
        refs.resolve_name(repo, "abc", table)  # too short to be a prefix


def test_check_name() -> None:
    for ok in ("v1.0", "good-state", "day_2"):
        refs.check_name("tag", ok)
    for bad in ("E3", "12", "a/b", "a..b", "x.lock", "with space", ""):
        with pytest.raises(UsageError):
            refs.check_name("tag", bad)


def test_set_ref_is_conditional(repo: Repository, area: Path) -> None:
    c1 = bytes.fromhex(save(repo, area).commit)
    (area / "vm.vmx").write_text("changed\n")
    c2 = bytes.fromhex(save(repo, area).commit)
    ref = refs.BRANCH_PREFIX + b"b"
    refs.set_ref(repo, ref, c1, create=True)
    with pytest.raises(UsageError, match="moved"):
        refs.set_ref(repo, ref, c2, create=True)
    with pytest.raises(UsageError, match="moved"):
        refs.set_ref(repo, ref, c2, old=c2)
    refs.set_ref(repo, ref, c2, old=c1)
    assert refs.read_refs(repo).branches["b"] == c2
    with pytest.raises(UsageError):  # entry refs are never overwritten
        refs.set_ref(repo, refs.entry_ref(1), c2, create=True)
    refs.delete_ref(repo, ref)
    assert "b" not in refs.read_refs(repo).branches
    assert (repo.path / "refs" / "vml" / "entries" / "1").read_text().strip() == c1.hex()


def test_a_removed_entry_s_number_is_never_given_again(repo: Repository, area: Path) -> None:
    save(repo, area)
    (area / "vm.vmx").write_text("two\n")
    e2 = save(repo, area)
    assert e2.entry == "E2"
    refs.delete_ref(repo, refs.entry_ref(2))  # as `vml rm E2 --force` does, last
    (area / "vm.vmx").write_text("three\n")
    assert save(repo, area, full=True).entry == "E3"


def test_entry_numbers_out_of_range_are_refused_or_ignored(repo: Repository) -> None:
    """``E`` and thousands of digits once gave a traceback (int()'s digit limit)."""
    some = bytes(range(20))
    refs.set_ref(repo, refs.entry_ref(1), some)
    # No number VML makes; only packed-refs holds a name this long.
    with open(repo.path / "packed-refs", "a") as f:
        f.write(f"{some.hex()} refs/vml/entries/{'9' * 5000}\n")
    refs.set_ref(repo, refs.ENTRY_PREFIX + b"007", some)
    assert refs.read_refs(repo).entries == {1: some}
    for bad in ("E" + "9" * 5000, "E0", "e1000000000000000000"):
        with pytest.raises(UsageError, match="out of range"):
            refs.resolve_name(repo, bad)
    with pytest.raises(UnknownEntry) as e:
        refs.resolve_name(repo, "9" * 5000)  # bare digits: tried as a commit id, too long
    assert len(e.value.message) < 100


def _entries_through_dulwich(repo: Repository) -> dict[int, bytes]:
    """Entry refs as git reads them: every ref through dulwich's general path."""
    out: dict[int, bytes] = {}
    for name, value in refs.all_refs(repo):
        tail = name[len(refs.ENTRY_PREFIX) :] if name.startswith(refs.ENTRY_PREFIX) else b""
        if tail.isdigit() and len(tail) <= 18 and not tail.startswith(b"0"):
            out[int(tail)] = bytes.fromhex(value.decode())
    return out


def test_entry_refs_read_fast_mean_what_git_reads(repo: Repository) -> None:
    """The one-listing read of entry refs gives what dulwich's ref by ref reading gives.

    Loose and packed refs, a loose ref over a packed one, a symbolic ref,
    upper-case hex, a lock file, a folder among the numbers, a leading zero,
    an empty loose file over a packed ref, a symbolic ref naming nothing.
    """
    ids = [bytes([i]) * 20 for i in range(1, 9)]
    for n in (1, 2, 3):
        refs.set_ref(repo, refs.entry_ref(n), ids[n])
    refs.set_ref(repo, refs.BRANCH_PREFIX + b"main", ids[7])
    with open(repo.path / "packed-refs", "w") as f:
        f.write("# pack-refs with: peeled fully-peeled sorted \n")
        for n, c in ((2, ids[5]), (4, ids[4]), (5, ids[5]), (11, ids[2]), (12, ids[3])):
            f.write(f"{c.hex()} refs/vml/entries/{n}\n")
    folder = repo.path / "refs" / "vml" / "entries"
    (folder / "6").write_text("ref: refs/heads/main\n")
    (folder / "7").write_text(ids[6].hex().upper() + "\n")
    (folder / "8.lock").write_text(ids[1].hex() + "\n")
    (folder / "9").mkdir()
    (folder / "9" / "x").write_text(ids[1].hex() + "\n")
    (folder / "010").write_text(ids[1].hex() + "\n")
    (folder / "11").write_text("")  # empty: git reads the packed value
    (folder / "12").write_text("ref: refs/heads/gone\n")  # names nothing: no entry
    repo.git.refs._invalidate_packed_refs_cache()  # type: ignore[attr-defined]
    fast = refs.read_refs(repo).entries
    assert fast == _entries_through_dulwich(repo)
    want = {1: ids[1], 2: ids[2], 3: ids[3], 4: ids[4], 5: ids[5], 6: ids[7], 7: ids[6]}
    assert fast == {**want, 11: ids[2]}


def test_shared_refs_read_fast_mean_what_git_reads(repo: Repository, tmp_path: Path) -> None:
    """Refs pushed here (``refs/vml/shared/``) read in one listing as dulwich reads them.

    A nested folder, a lock file, a link to a folder, a packed ref, a
    symbolic ref; and whether one has no E-number (every command asks).
    """
    ids = [bytes([i]) * 20 for i in range(1, 6)]
    for c in ids[:3]:
        refs.set_ref(repo, refs.SHARED_PREFIX + c.hex().encode(), c)
    refs.set_ref(repo, refs.SHARED_PREFIX + b"x/" + ids[3].hex().encode(), ids[3])
    refs.set_ref(repo, refs.BRANCH_PREFIX + b"main", ids[4])
    folder = repo.path / "refs" / "vml" / "shared"
    (folder / "y.lock").write_text(ids[4].hex() + "\n")
    (folder / "sym").write_text("ref: refs/heads/main\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "z").write_text(ids[4].hex() + "\n")
    (folder / "link").symlink_to(elsewhere)
    with open(repo.path / "packed-refs", "w") as f:
        f.write(f"{ids[4].hex()} refs/vml/shared/packed\n")
    repo.git.refs._invalidate_packed_refs_cache()  # type: ignore[attr-defined]
    through_dulwich = {n: v for n, v in refs.all_refs(repo) if n.startswith(refs.SHARED_PREFIX)}
    fast = refs._flat_refs(repo, refs.SHARED_PREFIX)
    assert fast == through_dulwich and len(fast) == 6
    assert refs.unnumbered_pushes(repo)
    for n, c in enumerate(ids, start=1):
        refs.set_ref(repo, refs.entry_ref(n), c)
    assert not refs.unnumbered_pushes(repo)
