"""Round trip: whatever sequence of edits and saves, every entry checks out byte for byte.

A Hypothesis state machine edits a small area (page writes, block writes,
zeroed blocks and holes, a disk that grows, shrinks or is truncated, small
files added and removed, exec bits flipped), saves it as full, incremental
or differential entries (with and without ``--base``), and checks entries out
into new folders, into folders holding another entry, and in place into the
working area (restore).  A memory file ``vm.ram`` takes runs of the disk's
pages (a guest's page cache), which saves store as references to the disk's
blobs (version-3 deltas, #12).  Each result must equal the state that was saved:
the same files, the same bytes, the same exec bits and modification times.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.conftest import TEST_BLOCK, allocated, digest_area, edit
from vml.errors import DirtyArea, NothingToCommit
from vml.plumbing.building import punch_hole
from vml.plumbing.cache import drop_cache
from vml.plumbing.repository import init_repository
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit
from vml.porcelain.status import status

PAGE = 4096
MAX_DISK = 8 * TEST_BLOCK  # 512 KiB: eight blocks
RAM = 2 * TEST_BLOCK  # a memory file (saved after the disk: it may reference the disk's pages)
SMALL_NAMES = ("notes.txt", "vm.nvram", "run.sh")

Snapshot = dict[str, tuple[object, ...]]


class RoundTrip(RuleBasedStateMachine):
    """The area, the repository, and what each entry must check out as."""

    @initialize(
        size=st.integers(TEST_BLOCK + 1, MAX_DISK),
        seed=st.integers(0, 2**16),
    )
    def setup(self, size: int, seed: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vml-prop-"))
        self.repo = init_repository(self.tmp / "repo", TEST_BLOCK)
        self.area = self.tmp / "area"
        self.area.mkdir()
        (self.area / "vm.vmx").write_text('displayName = "prop"\n')
        with open(self.area / "disk.img", "wb") as f:
            f.truncate(size)
            f.seek(0)
            f.write(seed.to_bytes(4, "big") * 1024)
        (self.area / "vm.ram").write_bytes(os.urandom(RAM))
        self.saved: dict[str, Snapshot] = {}  # entry -> state with mtimes
        self.order: list[str] = []
        self.area_entry: str | None = None
        self.folders: list[Path] = []
        self.counter = 0

    def teardown(self) -> None:
        repo = getattr(self, "repo", None)
        if repo is not None:
            repo.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers --

    def _disk(self) -> Path:
        return self.area / "disk.img"

    def _size(self) -> int:
        return self._disk().stat().st_size

    def _same(self, a: Snapshot, b: Snapshot) -> bool:
        """Equal content, sizes and exec bits (mtimes aside)."""
        strip = lambda s: {k: v[:3] for k, v in s.items()}  # noqa: E731
        return strip(a) == strip(b)

    def _dirty(self) -> bool:
        if self.area_entry is None:
            return True
        return not self._same(digest_area(self.area), self.saved[self.area_entry])

    # -- edits --

    @rule(page=st.integers(0, MAX_DISK // PAGE - 1), byte=st.integers(0, 255))
    def write_page(self, page: int, byte: int) -> None:
        off = min(page * PAGE, max(0, self._size() - PAGE))
        edit(self._disk(), off, bytes([byte]) * PAGE)

    @rule(block=st.integers(0, 7), seed=st.integers(0, 255))
    def write_block(self, block: int, seed: int) -> None:
        off = min(block * TEST_BLOCK, self._size())
        edit(self._disk(), off, bytes((seed + i) % 256 for i in range(256)) * (TEST_BLOCK // 256))

    @rule(block=st.integers(0, 7), hole=st.booleans())
    def zero_block(self, block: int, hole: bool) -> None:
        size = self._size()
        off = block * TEST_BLOCK
        if off >= size:
            return
        n = min(TEST_BLOCK, size - off)
        if hole:
            fd = os.open(self._disk(), os.O_RDWR)
            try:
                punch_hole(fd, off, n)
            finally:
                os.close(fd)
        else:
            edit(self._disk(), off, bytes(n))

    @rule(size=st.one_of(st.integers(0, MAX_DISK), st.sampled_from([TEST_BLOCK, 3 * TEST_BLOCK])))
    def resize(self, size: int) -> None:
        os.truncate(self._disk(), size)

    @rule(
        src=st.integers(0, MAX_DISK // PAGE - 8),
        dst=st.integers(0, RAM // PAGE - 8),
        run=st.integers(4, 8),
    )
    def cache_disk_pages(self, src: int, dst: int, run: int) -> None:
        # The guest writes a file and its page cache keeps it.
        if (src + run) * PAGE > self._size():
            return
        data = os.urandom(run * PAGE)
        edit(self._disk(), src * PAGE, data)
        edit(self.area / "vm.ram", dst * PAGE, data)

    @rule(page=st.integers(0, RAM // PAGE - 1), seed=st.integers(0, 2**16))
    def write_ram_page(self, page: int, seed: int) -> None:
        edit(self.area / "vm.ram", page * PAGE, seed.to_bytes(4, "big") * (PAGE // 4))

    @rule(name=st.sampled_from(SMALL_NAMES), length=st.integers(0, 3000), byte=st.integers(0, 255))
    def write_small(self, name: str, length: int, byte: int) -> None:
        (self.area / name).write_bytes(bytes([byte]) * length)

    @rule(name=st.sampled_from(SMALL_NAMES))
    def remove_small(self, name: str) -> None:
        (self.area / name).unlink(missing_ok=True)

    @rule(name=st.sampled_from(("disk.img", "vm.vmx", *SMALL_NAMES)))
    def flip_exec(self, name: str) -> None:
        p = self.area / name
        if p.exists():
            mode = p.stat().st_mode & 0o777
            p.chmod(0o644 if mode & 0o111 else 0o755)

    @rule()
    def forget_cache(self) -> None:
        # The area cache is only an accelerator: everything must work without it.
        drop_cache(self.area)

    # -- saves --

    @rule(
        how=st.sampled_from(["full", "incremental", "differential", "base"]),
        pick=st.integers(0, 1000),
    )
    def save(self, how: str, pick: int) -> None:
        before = digest_area(self.area, mtimes=True)
        base = None
        kind: str | None = how
        if how == "base":
            if not self.order:
                return
            base = self.order[pick % len(self.order)]
            kind = None
        if self.area_entry is not None and not self._dirty():
            try:
                commit(self.repo, self.area, kind=kind, base=base)
            except NothingToCommit:
                return
            raise AssertionError("an unchanged area made an entry")
        res = commit(self.repo, self.area, kind=kind, base=base, message=f"save {how}")
        if self.area_entry is None:
            assert res.kind == "full" and res.parent is None
        elif how == "base":
            assert res.kind == "differential" and res.parent == base
        elif how == "incremental":
            assert res.parent == self.area_entry
        elif how == "full":
            assert res.parent is None
        assert digest_area(self.area, mtimes=True) == before, "saving changed the area"
        self.saved[res.entry] = before
        self.order.append(res.entry)
        self.area_entry = res.entry

    # -- checkouts --

    @precondition(lambda self: bool(self.order))
    @rule(pick=st.integers(0, 1000))
    def checkout_new(self, pick: int) -> None:
        name = self.order[pick % len(self.order)]
        self.counter += 1
        dest = self.tmp / f"co{self.counter}"
        res = checkout(self.repo, name, dest)
        assert not res.in_place
        assert digest_area(dest, mtimes=True) == self.saved[name]
        self._check_sparse(dest, name)
        self.folders.append(dest)

    @precondition(lambda self: bool(self.folders))
    @rule(pick=st.integers(0, 1000), which=st.integers(0, 1000))
    def checkout_over(self, pick: int, which: int) -> None:
        name = self.order[pick % len(self.order)]
        dest = self.folders[which % len(self.folders)]
        res = checkout(self.repo, name, dest)
        assert res.in_place
        assert digest_area(dest, mtimes=True) == self.saved[name]

    @precondition(lambda self: bool(self.order))
    @rule(pick=st.integers(0, 1000), force=st.booleans())
    def restore_in_place(self, pick: int, force: bool) -> None:
        name = self.order[pick % len(self.order)]
        if self._dirty() and not force:
            try:
                restore(self.repo, name, self.area)
            except DirtyArea:
                return
            raise AssertionError("restore overwrote unsaved changes")
        before = digest_area(self.area, mtimes=True)
        held = self.saved.get(self.area_entry or "", {})
        res = restore(self.repo, name, self.area, force=force)
        want = dict(self.saved[name])
        # Files in neither entry are the user's: --force leaves them as they were.
        mine = {p: v for p, v in before.items() if p not in held and p not in want}
        assert sorted(mine) == res.left_alone
        want.update(mine)
        assert digest_area(self.area, mtimes=True) == want
        self.area_entry = name
        if mine:  # the area holds the entry plus those files: remove them to carry on
            for p in mine:
                (self.area / p).unlink()

    def _check_sparse(self, dest: Path, name: str) -> None:
        disk = dest / "disk.img"
        if disk.exists():
            # Zero blocks come back as holes: never more allocated than data blocks.
            data = disk.read_bytes()
            nonzero = sum(
                1
                for i in range(0, len(data), TEST_BLOCK)
                if data[i : i + TEST_BLOCK].count(0) != len(data[i : i + TEST_BLOCK])
            )
            assert allocated(disk) <= nonzero * TEST_BLOCK + 2 * TEST_BLOCK

    @invariant()
    def status_agrees(self) -> None:
        if getattr(self, "area_entry", None) is None:
            return
        res = status(self.repo, self.area)
        assert res.clean == (not self._dirty()), (res.changes, self._dirty())


RoundTrip.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=14,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRoundTrip = RoundTrip.TestCase
