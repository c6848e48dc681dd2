"""No process deletes a pack another process, or itself, still needs.

A pack's name is its content's hash: two writers of the same objects in the
same order write the same pack, and gc's copy of what must stay can be a
pack it was about to delete.  Each test drives the steps of two parties in
the interleaving that lost objects before (hooks in the code's own
callbacks, no sleeps): every object a party still needs must read back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vml.plumbing import packwriter
from vml.plumbing import refs as refs_mod
from vml.plumbing.gc import collect
from vml.plumbing.keeps import keep_protects
from vml.plumbing.packreader import BLOB, PackReader, blob_id
from vml.plumbing.packwriter import PackWriter
from vml.plumbing.repository import Repository


def _write(repo: Repository, blobs: list[bytes], *, release: bool = True) -> PackWriter:
    w = PackWriter(repo)
    for b in blobs:
        w.add_blob(b)
    w.finish()
    if release:
        w.release()
    return w


def _reads(repo: Repository, blobs: list[bytes]) -> bool:
    r = PackReader(repo)
    try:
        return all(r.in_packs(blob_id(b)) and r.read(blob_id(b), BLOB)[1] == b
                   for b in blobs)  # fmt: skip
    finally:
        r.close()


def _ref(repo: Repository, name: str, data: bytes) -> None:
    refs_mod.set_ref(repo, b"refs/tags/" + name.encode(), blob_id(data), create=True)


def _half_live_pack(repo: Repository) -> None:
    """A pack gc rewrites (one live object, one dead): its copy calls the progress hook."""
    live, dead = b"live object " * 500, b"dead object " * 500
    _write(repo, [live, dead])
    _ref(repo, "live", live)


def _once(action: Callable[[], None]) -> Callable[[str, int, int], None]:
    done: list[bool] = []

    def progress(stage: str, _n: int, _total: int) -> None:
        if stage == "copy" and not done:
            done.append(True)
            action()

    return progress


def test_gc_never_deletes_a_pack_its_rescue_wrote_byte_for_byte(repo: Repository) -> None:
    # Pack P holds one object no ref reaches: gc will delete it whole.  While
    # gc copies, a save finishes and its ref reaches that object; gc's
    # rescue (under the lock) copies it into a new pack: the same bytes as P,
    # so the same name.  Deleting "the packs that go" deleted the rescue.
    late = b"an object a save reuses " * 400
    _write(repo, [late])
    _half_live_pack(repo)
    res = collect(repo, progress=_once(lambda: _ref(repo, "late", late)))
    assert not res.deferred and res.new_packs
    assert _reads(repo, [late]), "gc deleted the pack its rescue had just written"


def test_a_writer_that_aborts_never_deletes_a_pack_another_found(repo: Repository) -> None:
    blobs = [b"same objects %d " % i * 700 for i in range(3)]
    a = _write(repo, blobs, release=False)  # A published it; its refs are not set yet
    b = _write(repo, blobs, release=False)  # B found it there, byte for byte
    assert a.names == b.names
    a.abort()  # A fails before its refs move
    assert _reads(repo, blobs), "A's abort deleted the pack B relies on"
    b.release()
    _ref(repo, "b", blobs[0])
    assert _reads(repo, blobs)


def test_two_writers_sealing_the_same_pack_at_once(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A decides the pack is new, then B seals the same bytes completely
    # (while A writes its index), then A publishes over B's and aborts.
    blobs = [b"written twice at once %d " % i * 600 for i in range(2)]
    real = packwriter.write_pack_index_v2
    b: list[PackWriter] = []

    def a_writes_its_index(f: object, entries: object, checksum: bytes) -> object:
        if not b:
            monkeypatch.setattr(packwriter, "write_pack_index_v2", real)
            b.append(_write(repo, blobs, release=False))
        return real(f, entries, checksum)  # type: ignore[arg-type]

    a = PackWriter(repo)
    for blob in blobs:
        a.add_blob(blob)
    monkeypatch.setattr(packwriter, "write_pack_index_v2", a_writes_its_index)
    a.finish()
    assert b and a.names == b[0].names
    a.abort()
    assert _reads(repo, blobs), "A's abort deleted the pack B published"
    keep = repo.objects_dir / "pack" / f"{a.names[0] if a.names else b[0].names[0]}.keep"
    assert keep_protects(keep), "B's pack lost its protection from gc"
    b[0].release()
    assert not keep.exists()


def test_gc_leaves_a_pack_a_pending_writer_found(repo: Repository) -> None:
    # An unreferenced pack (an entry removed, a failed save's) and a save
    # that writes the very same pack: until its refs move, only its claim
    # keeps gc from deleting what it found there.
    blobs = [b"saved again after rm %d " % i * 500 for i in range(2)]
    _write(repo, blobs)  # garbage now
    b = _write(repo, blobs, release=False)  # found, pending
    collect(repo)
    assert _reads(repo, blobs), "gc deleted the pack a pending save found"
    b.release()
    collect(repo)
    assert not _reads(repo, blobs)  # released and unreferenced: garbage


def test_gc_leaves_a_pack_claimed_while_it_ran(repo: Repository) -> None:
    # gc decided the pack goes; a save then publishes the same bytes (it
    # finds the pack) before gc deletes.  The decision is taken again under
    # the pack folder's lock.
    blobs = [b"claimed in between %d " % i * 500 for i in range(2)]
    _write(repo, blobs)
    _half_live_pack(repo)
    late: list[PackWriter] = []
    collect(repo, progress=_once(lambda: late.append(_write(repo, blobs, release=False))))
    assert late and _reads(repo, blobs), "gc deleted a pack a save claimed while gc ran"
    late[0].release()


def test_gc_leaves_an_indexless_pack_a_writer_published_again(repo: Repository) -> None:
    # A pack left without its index (a consolidation killed between the
    # two deletions) is redundant; a save that writes the same bytes
    # meanwhile puts its index back: the pack is then that save's.
    blobs = [b"orphan then published %d " % i * 500 for i in range(2)]
    w = _write(repo, blobs)
    (repo.objects_dir / "pack" / f"{w.names[0]}.idx").unlink()
    _half_live_pack(repo)
    late: list[PackWriter] = []
    collect(repo, progress=_once(lambda: late.append(_write(repo, blobs, release=False))))
    assert late and _reads(repo, blobs), "gc deleted a pack a save had just published"
    late[0].release()


def test_a_claim_is_dropped_only_by_its_owner(repo: Repository) -> None:
    # What a fetch or a save puts in a .keep: a line per claim; one
    # party's release leaves the others' protection.
    from vml.plumbing.keeps import claim, claim_line, unclaim

    keep = repo.objects_dir / "pack" / ("pack-" + "5" * 40 + ".keep")
    keep.parent.mkdir(parents=True, exist_ok=True)
    first, second = claim_line("first"), claim_line("second")
    assert claim(keep, first, shared=True) and claim(keep, second, shared=True)
    unclaim(keep, first)
    assert keep_protects(keep) and second in keep.read_text().splitlines()
    assert first not in keep.read_text().splitlines()
    unclaim(keep, second)
    assert not keep.exists()
    keep.write_text("kept by the admin\n")  # not ours: never claimed, never removed
    assert not claim(keep, first, shared=False)
    unclaim(keep, first)
    assert keep.read_text() == "kept by the admin\n"


def test_repair_never_moves_aside_a_pack_published_again_meanwhile(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gc --repair scans a damaged pack, then moves it to the quarantine.  A
    # save that writes the same bytes in between replaces it with a whole
    # one and claims it: moving that aside took the save's objects away.
    from vml.plumbing import packscan

    blobs = [b"damaged then written again %d " % i * 500 for i in range(3)]
    name = _write(repo, blobs).names[0]
    pack = repo.objects_dir / "pack" / f"{name}.pack"
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size - 300)  # set aside: its index says otherwise
    real = packscan.scan_pack
    late: list[PackWriter] = []

    def scan_then_a_save_publishes(path: Path) -> packscan.Scan:
        scan = real(path)
        late.append(_write(repo, blobs, release=False))
        return scan

    monkeypatch.setattr(packscan, "scan_pack", scan_then_a_save_publishes)
    packscan.repair(repo)
    assert late and _reads(repo, blobs), "the repair moved aside a pack a save had published"
    late[0].release()


def test_a_consolidation_leaves_an_input_a_writer_claimed_while_it_ran(
    repo: Repository,
) -> None:
    # The objects are in the consolidation's output too, but the writer
    # names its pack (its size, a fetch's check that its pack is still
    # there): the pack it found must not vanish under it.
    from vml.plumbing.repack import consolidate

    first = [b"first input %d " % i * 500 for i in range(2)]
    _write(repo, first)
    _write(repo, [b"second input %d " % i * 500 for i in range(2)])
    late: list[PackWriter] = []

    def progress(stage: str, _n: int, _total: int) -> None:
        if stage == "pack" and not late:
            late.append(_write(repo, first, release=False))

    done = consolidate(repo, limit=0, progress=progress)
    assert done is not None and len(done.merged) == 2 and late
    pack_dir = repo.objects_dir / "pack"
    assert (pack_dir / f"{late[0].names[0]}.pack").exists(), "a claimed pack was deleted"
    assert late[0].disk_bytes > 0
    late[0].release()
    assert _reads(repo, first)


def test_repair_never_moves_aside_a_pack_published_again_and_released_meanwhile(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above, but the save is done before the repair moves the pack: its
    # refs reach the objects and its claim is gone.  The files the repair
    # would move are no longer the damaged ones it scanned but the save's
    # whole pack, and the only copy of what the save's refs reach.
    from vml.plumbing import packscan

    blobs = [b"damaged, written again, referenced %d " % i * 500 for i in range(3)]
    name = _write(repo, blobs).names[0]
    pack = repo.objects_dir / "pack" / f"{name}.pack"
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size - 300)  # set aside: its index says otherwise
    real = packscan._quarantine
    done: list[PackWriter] = []

    def a_save_publishes_first(r: Repository, paths: list[Path]) -> list[str]:
        if not done:
            done.append(_write(repo, blobs))  # published, its refs set, released
            _ref(repo, "saved", blobs[0])
        return real(r, paths)

    monkeypatch.setattr(packscan, "_quarantine", a_save_publishes_first)
    packscan.repair(repo)
    assert done and done[0].names == [name]
    assert _reads(repo, blobs), "the repair moved aside the pack a save had just published"


def test_a_failed_writer_never_deletes_a_pack_others_relied_on(repo: Repository) -> None:
    # A big save seals its first packs while it goes on; they are visible,
    # and a second save stores a block it finds there only by naming it
    # (a pack's objects are found by anyone once its index is in place).
    # The second save's ref moves, then the first save fails: its sealed
    # packs held the only copy of what an entry now names.
    import os

    big = PackWriter(repo, roll_bytes=64 << 10)
    blobs = [os.urandom(20 << 10) for _ in range(6)]
    for b in blobs:
        big.add_blob(b)
    big._wait_sealed()  # the first packs are sealed and published
    sealed = list(big.names)
    assert sealed
    r = PackReader(repo)
    try:
        found = [b for b in blobs if r.in_packs(blob_id(b))]
    finally:
        r.close()
    assert found  # what a second save reuses instead of storing it
    _ref(repo, "second", found[0])  # its entry is published
    big.abort()  # the first save fails
    assert _reads(repo, found[:1]), "a failed save deleted a pack an entry relies on"
    collect(repo)  # its packs are gc's to judge: the block a ref reaches stays
    assert _reads(repo, found[:1])
    assert not list((repo.objects_dir / "pack").glob("*.keep"))
