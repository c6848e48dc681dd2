"""A pack whose refs are not set yet survives a concurrent gc; a dead writer's marker does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vml.plumbing.gc import collect
from vml.plumbing.keeps import PENDING_KEEP
from vml.plumbing.packreader import PackReader
from vml.plumbing.packwriter import PackWriter
from vml.plumbing.repository import Repository


def _pack_with_one_blob(repo: Repository, data: bytes) -> tuple[PackWriter, bytes, str]:
    writer = PackWriter(repo)
    sha = writer.add_blob(data)
    name = writer.finish()
    assert name is not None
    return writer, sha, name


def test_gc_keeps_a_finished_pack_until_its_writer_releases_it(repo: Repository) -> None:
    # Nothing references the blob yet: it is exactly what a save holds
    # between writing its pack and moving its ref.
    writer, sha, name = _pack_with_one_blob(repo, b"block data " * 1000)
    keep = repo.objects_dir / "pack" / f"{name}.keep"
    assert keep.read_text().split()[0] == PENDING_KEEP
    collect(repo)
    reader = PackReader(repo)
    try:
        assert reader.contains(sha), "gc dropped a pending pack"
    finally:
        reader.close()
    writer.release()
    assert not keep.exists()
    collect(repo)  # unreferenced and released: garbage now
    reader = PackReader(repo)
    try:
        assert not reader.contains(sha)
    finally:
        reader.close()


def test_the_marker_of_a_dead_writer_is_stale(repo: Repository) -> None:
    _writer, sha, name = _pack_with_one_blob(repo, b"orphan " * 1000)
    keep = repo.objects_dir / "pack" / f"{name}.keep"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    keep.write_text(f"{PENDING_KEEP} {dead}\n")
    collect(repo)
    assert not keep.exists()
    reader = PackReader(repo)
    try:
        assert not reader.contains(sha)
    finally:
        reader.close()


def test_a_keep_file_of_someone_else_is_honoured(repo: Repository) -> None:
    writer, sha, name = _pack_with_one_blob(repo, b"kept by hand " * 1000)
    writer.release()
    (repo.objects_dir / "pack" / f"{name}.keep").write_text("kept by the admin\n")
    collect(repo)
    reader = PackReader(repo)
    try:
        assert reader.contains(sha)
    finally:
        reader.close()


def test_a_big_write_rolls_over_into_several_packs(repo: Repository) -> None:
    import os
    import subprocess

    writer = PackWriter(repo, roll_bytes=64 << 10)
    blobs = [os.urandom(20 << 10) for _ in range(20)]  # ~400 KiB: several packs
    ids = [writer.add_blob(b) for b in blobs]
    last = writer.finish()
    assert last is not None and len(writer.names) > 3 and writer.names[-1] == last
    pack_dir = repo.objects_dir / "pack"
    assert all((pack_dir / f"{n}.keep").exists() for n in writer.names)
    for n in writer.names:  # git accepts every one of them
        subprocess.run(["git", "verify-pack", str(pack_dir / f"{n}.idx")], check=True)
    reader = PackReader(repo)
    try:
        assert [reader.read(i)[1] for i in ids] == blobs
    finally:
        reader.close()
    writer.release()
    assert not list(pack_dir.glob("*.keep"))


def test_abort_after_a_rollover_leaves_only_what_gc_collects(repo: Repository) -> None:
    # The packs it sealed were visible: another command may rely on them
    # (test_pack_ownership.py), so they are left, unclaimed, to gc.
    import os

    writer = PackWriter(repo, roll_bytes=64 << 10)
    for _ in range(10):
        writer.add_blob(os.urandom(20 << 10))
    writer.abort()
    pack_dir = repo.objects_dir / "pack"
    assert not list(pack_dir.glob("*.keep")) and not list(pack_dir.glob("tmp_*"))
    collect(repo)
    assert not [p for p in pack_dir.iterdir()]


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


def test_one_gc_clears_what_killed_claimants_left(repo: Repository) -> None:
    # Claims of dead processes (this version's and the two-word line of an
    # earlier VML), the shared mark they leave, and a .keep being rewritten
    # when its writer was killed: the pack is garbage again, and goes.
    import os

    _writer, sha, name = _pack_with_one_blob(repo, b"claimed by the dead " * 1000)
    pack_dir = repo.objects_dir / "pack"
    keep = pack_dir / f"{name}.keep"
    dead = _dead_pid()
    keep.write_text(f"{PENDING_KEEP} {dead} 1a.2b\n{PENDING_KEEP} {dead}\nvml-shared\n")
    torn = pack_dir / f"tmp_vml_{dead}_{name}.keep-tmp"
    torn.write_text(f"{PENDING_KEEP} {dead} 1a.2b\n")
    # A live claim among dead ones keeps the pack, and only that claim stays.
    live = pack_dir / ("pack-" + "6" * 40 + ".keep")
    live.write_text(f"{PENDING_KEEP} {dead} x\n{PENDING_KEEP} {os.getpid()} y\nvml-shared\n")
    collect(repo)
    assert not keep.exists() and not torn.exists()
    assert live.read_text() == f"{PENDING_KEEP} {os.getpid()} y\nvml-shared\n"
    reader = PackReader(repo)
    try:
        assert not reader.contains(sha)
    finally:
        reader.close()


def test_keep_files_vml_did_not_write_protect_for_ever(repo: Repository) -> None:
    # Empty (git's `index-pack --keep` without a message, a `touch`), or
    # git's own message: never changed, never dropped, whoever is dead.
    for i, text in enumerate(["", f"receive-pack {_dead_pid()} on host\n"]):
        _writer, sha, name = _pack_with_one_blob(repo, b"git keeps it %d " % i * 1000)
        _writer.release()
        keep = repo.objects_dir / "pack" / f"{name}.keep"
        keep.write_text(text)
        collect(repo)
        assert keep.read_text() == text
        reader = PackReader(repo)
        try:
            assert reader.contains(sha)
        finally:
            reader.close()


def test_a_claim_is_durable_before_it_is_relied_on(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .keep is written as every durable file: its data fsynced, renamed, its folder fsynced.

    Written without, a power loss could leave it empty, and an empty .keep
    (git's convention) protects its pack for ever.
    """
    import os

    from vml.plumbing import keeps

    done: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        what = os.readlink(f"/proc/self/fd/{fd}")
        done.append(f"fsync {Path(what).name}")
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        done.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    keep = repo.objects_dir / "pack" / "pack-x.keep"
    keeps.claim(keep, keeps.claim_line("t1"), shared=False)
    keeps.claim(keep, keeps.claim_line("t2"), shared=False)
    for _ in range(2):
        tmp_sync = next(i for i, d in enumerate(done) if d.startswith("fsync tmp_vml_"))
        rename = done.index("rename pack-x.keep")
        assert tmp_sync < rename and done[rename + 1] == "fsync pack", done
        done = done[rename + 2 :]
    assert keep.read_text().count(PENDING_KEEP) == 2


@pytest.mark.parametrize(
    "data",
    [
        b"",  # cut to nothing: git's empty .keep, which protects
        b"vml-pen",  # cut mid-word
        b"\0" * 40,  # a file system that shows zeros after a crash
        f"{PENDING_KEEP} \u00b2 t\n".encode(),  # a digit Python's int() refuses
        f"{PENDING_KEEP} {'9' * 40} t\n".encode(),  # a pid os.kill() cannot take
        f"{PENDING_KEEP} 0 t\n".encode(),  # os.kill(0, 0) asks about our own group
        b"\xff\xfe garbage",  # not UTF-8
    ],
)
def test_a_damaged_keep_never_breaks_gc_and_never_loses_its_pack_early(
    repo: Repository, data: bytes
) -> None:
    """Whatever a .keep holds, gc runs; a pack is deleted only when no live claim or foreign mark holds it."""
    from vml.plumbing.keeps import keep_protects

    writer, sha, name = _pack_with_one_blob(repo, b"claimed " * 1000)
    writer.release()
    keep = repo.objects_dir / "pack" / f"{name}.keep"
    keep.write_bytes(data)
    protects = keep_protects(keep)
    collect(repo)
    reader = PackReader(repo)
    try:
        assert reader.contains(sha) == protects
    finally:
        reader.close()
    # Only a line VML writes, naming a process that cannot be alive, is dropped.
    vml_line = data.startswith(PENDING_KEEP.encode() + b" ") and data.isascii()
    assert protects == (not vml_line)


def test_near_end_seals_a_big_writes_pack_early_once(repo: Repository) -> None:
    # A big save (it rolled over already) seals the pack it fills when told
    # that little is left, so its last pack holds only that little.
    import os

    writer = PackWriter(repo, roll_bytes=64 << 10)
    blobs = [os.urandom(20 << 10) for _ in range(6)]
    ids = [writer.add_blob(b) for b in blobs[:5]]  # one roll-over, 40 KiB in the next pack
    writer.near_end()
    writer.near_end()  # once only
    ids.append(writer.add_blob(blobs[5]))
    writer.finish()
    assert len(writer.names) == 3
    pack_dir = repo.objects_dir / "pack"
    for n in writer.names:
        subprocess.run(["git", "verify-pack", str(pack_dir / f"{n}.idx")], check=True)
    reader = PackReader(repo)
    try:
        assert [reader.read(i)[1] for i in ids] == blobs
        assert reader.position(ids[5])[0] != reader.position(ids[4])[0]  # in the last pack
    finally:
        reader.close()
    writer.release()


def test_near_end_leaves_a_small_write_in_one_pack(repo: Repository) -> None:
    import os

    writer = PackWriter(repo, roll_bytes=64 << 10)
    writer.add_blob(os.urandom(20 << 10))
    writer.near_end()  # no roll-over yet: a later save stays one pack
    writer.add_blob(os.urandom(20 << 10))
    writer.finish()
    assert len(writer.names) == 1
    writer.release()


def test_near_end_before_a_roll_over_is_asked_again_after_it(repo: Repository) -> None:
    # A save told it nears its end before its pack rolled over (a pack of
    # its size left) may still roll over: told again, it seals that pack.
    import os

    writer = PackWriter(repo, roll_bytes=64 << 10)
    writer.add_blob(os.urandom(20 << 10))
    writer.near_end()  # no roll-over yet: nothing happens, and nothing is spent
    for _ in range(4):
        writer.add_blob(os.urandom(20 << 10))  # rolls over at the fourth blob
    assert writer.filling > 12
    writer.near_end()
    assert writer.filling == 12  # sealed: the next pack holds only its header
    writer.add_blob(os.urandom(20 << 10))
    writer.finish()
    assert len(writer.names) == 3
    writer.release()
