"""Pack consolidation and gc never delete the pack they just wrote.

Pack names are their content's hash: a consolidation whose output holds
exactly the objects of one of its inputs, in that input's order (the other
inputs only duplicating them, as a deferred gc or a rescue leaves them),
writes a pack of the same name as that input.  Deleting "the old packs"
then deleted the new one, and every object only it held was lost (found by
the crash stress with concurrent commands).
"""

from __future__ import annotations

from vml.plumbing.packreader import BLOB, PackReader
from vml.plumbing.packwriter import PackWriter
from vml.plumbing.repack import consolidate
from vml.plumbing.repository import Repository


def _pack(repo: Repository, blobs: list[bytes]) -> list[bytes]:
    w = PackWriter(repo)
    ids = [w.add_blob(b) for b in blobs]
    w.finish()
    w.release()
    return ids


def test_a_consolidation_whose_output_equals_an_input_keeps_it(repo: Repository) -> None:
    big = [bytes([i]) * 70_000 + b"%d" % i for i in range(2)]
    ids = _pack(repo, big)  # pack X: a, b
    _pack(repo, big[:1])  # pack Y: a again (a duplicate), smaller: merged first
    done = consolidate(repo, limit=0)
    assert done is not None and len(done.merged) == 2
    r = PackReader(repo)
    try:
        for sha, data in zip(ids, big, strict=True):
            assert r.read(sha, BLOB)[1] == data  # was: "object ... is missing"
    finally:
        r.close()
    packs = list((repo.objects_dir / "pack").glob("pack-*.pack"))
    assert len(packs) == 1 and packs[0].with_suffix(".idx").exists()


def test_a_writer_that_aborts_leaves_an_identical_older_pack_alone(repo: Repository) -> None:
    blobs = [b"same content %d" % i * 1000 for i in range(3)]
    ids = _pack(repo, blobs)
    w = PackWriter(repo)
    for b in blobs:  # the same objects in the same order: a pack of the same name
        w.add_blob(b)
    w.finish()
    w.abort()  # e.g. the save that wrote it failed before publishing
    r = PackReader(repo)
    try:
        for sha, data in zip(ids, blobs, strict=True):
            assert r.read(sha, BLOB)[1] == data
    finally:
        r.close()
