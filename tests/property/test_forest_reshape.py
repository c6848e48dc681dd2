"""Random forests reshaped by random rm/convert/prune sequences stay intact.

A Hypothesis state machine saves a small area as full, incremental and
differential entries (page edits, whole-block writes, zeroed blocks, a disk
that grows or shrinks), restores older entries to grow branches, and
reshapes the forest with ``rm`` (with and without ``--force``), ``convert``
to every kind against random bases, ``prune`` and ``gc``.  At every step
each surviving entry must check out byte-identical to the state it was saved
from; at the end ``vml verify --all --read-data``, ``vml fsck`` and
``git fsck --full --strict`` are clean, and after ``gc`` every object left
is reachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from tests.conftest import TEST_BLOCK, edit
from tests.porcelain.test_forest_rm import snapshot
from vml.errors import ConcurrentChange, NothingToCommit, RepositoryBusy, UsageError, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.chains import commit_tree_parent
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import init_repository, open_repository
from vml.plumbing.retention import Policy
from vml.porcelain import commit as commit_mod
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit
from vml.porcelain.convert import convert
from vml.porcelain.fsck import fsck
from vml.porcelain.gc import gc
from vml.porcelain.prune import prune
from vml.porcelain.rm import rm
from vml.porcelain.verify import verify

PAGE = 4096
BLOCKS = 5


class Forest(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="vml-forest-"))
        self.repo = init_repository(self.tmp / "repo", TEST_BLOCK)
        self.area = self.tmp / "area"
        self.states: dict[int, dict[str, str]] = {}
        self.checks = 0

    def teardown(self) -> None:
        try:
            self.check_everything()
            gc(self.repo)
            self.check_everything()
            # After gc, every object left is reachable from a ref.
            git = subprocess.run(
                ["git", "fsck", "--unreachable", "--no-reflogs"],
                cwd=self.repo.path,
                capture_output=True,
                text=True,
            )
            assert "unreachable" not in git.stdout, git.stdout
        finally:
            self.repo.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def numbers(self) -> list[int]:
        return sorted(refs_mod.read_refs(self.repo).entries)

    @initialize()
    def first(self) -> None:
        self.area.mkdir()
        (self.area / "vm.vmx").write_text('displayName = "p"\n')
        with open(self.area / "disk.img", "wb") as f:
            f.truncate(BLOCKS * TEST_BLOCK)
            f.write(b"\x01" * 70_000)
        self._save("full")

    def _save(self, kind: str) -> None:
        try:
            r = commit(self.repo, self.area, kind=kind, allow_empty=True)
        except NothingToCommit:
            return
        self.states[int(r.entry[1:])] = snapshot(self.area)

    edits = st.lists(
        st.one_of(
            st.tuples(
                st.just("pages"),
                st.integers(0, BLOCKS * TEST_BLOCK // PAGE - 1),
                st.integers(1, 20),
                st.integers(0, 255),
            ),
            st.tuples(st.just("block"), st.integers(0, BLOCKS - 1), st.booleans(), st.just(0)),
            st.tuples(st.just("resize"), st.integers(3, BLOCKS + 2), st.just(0), st.just(0)),
        ),
        min_size=1,
        max_size=4,
    )

    @rule(
        changes=edits,
        kind=st.sampled_from(["incremental", "incremental", "differential", "full"]),
    )
    def edit_and_save(self, changes: list[tuple[str, int, int, int]], kind: str) -> None:
        self._edit(changes)
        self._save(kind)

    def _edit(self, changes: list[tuple[str, int, int, int]]) -> None:
        disk = self.area / "disk.img"
        for what, a, b, c in changes:
            if what == "pages":
                size = disk.stat().st_size
                off = min(a * PAGE, max(0, size - b * PAGE))
                edit(disk, off, bytes([c]) * (b * PAGE))
            elif what == "block":
                data = bytes(TEST_BLOCK) if b else bytes([a + 7]) * TEST_BLOCK
                edit(disk, a * TEST_BLOCK, data)
            else:
                with open(disk, "r+b") as f:
                    f.truncate(a * TEST_BLOCK - 1000)

    @rule(
        changes=edits,
        what=st.sampled_from(["rm", "rm --force", "convert", "prune"]),
        data=st.data(),
    )
    def save_while_reshaping(
        self, changes: list[tuple[str, int, int, int]], what: str, data: st.DataObject
    ) -> None:
        """A save held just before it publishes while rm, convert or prune runs.

        The new locks: never both succeed when one invalidates the other.  The
        save either publishes on a parent that is still an entry, or refuses
        having saved nothing; the reshape either happens whole or not at all.
        """
        self._edit(changes)
        saved = snapshot(self.area)
        nums = self.numbers()
        n = data.draw(st.sampled_from(nums))
        out: dict[str, object] = {}
        held, go = threading.Event(), threading.Event()
        real = commit_mod.publish_entry
        saver: list[int] = []

        def hold(*args: object, **kwargs: object) -> object:
            if threading.get_ident() in saver:
                held.set()
                go.wait(30)
            return real(*args, **kwargs)  # type: ignore[arg-type]

        def save() -> None:
            saver.append(threading.get_ident())
            own = open_repository(self.repo.path)
            try:
                out["res"] = commit(own, self.area, allow_empty=True)
            except VMLError as e:
                out["err"] = e
            finally:
                own.close()
                held.set()

        commit_mod.publish_entry = hold  # type: ignore[assignment]
        thread = threading.Thread(target=save)
        thread.start()
        try:
            assert held.wait(60)
            removed: list[int] = []
            try:
                if what.startswith("rm"):
                    rm(self.repo, [f"E{n}"], force=what.endswith("force"))
                    removed = [n]
                elif what == "convert":
                    convert(self.repo, f"E{n}", "full")
                else:
                    res = prune(self.repo, Policy(last=2))
                    removed = [int(e[1:]) for e in (res.rm.removed if res.rm else [])]
                event(f"{what} beside a save: done")
            except (UsageError, RepositoryBusy) as e:
                event(f"{what} beside a save: refused ({type(e).__name__})")
            for m in removed:
                del self.states[m]
        finally:
            go.set()
            thread.join(60)
            commit_mod.publish_entry = real  # type: ignore[assignment]
        if "res" in out:
            r = out["res"]
            self.states[int(r.entry[1:])] = saved  # type: ignore[attr-defined]
            event("the save published")
        else:
            assert isinstance(out.get("err"), ConcurrentChange), out
            event("the save refused")

    @rule(data=st.data())
    def restore_older(self, data: st.DataObject) -> None:
        n = data.draw(st.sampled_from(self.numbers()))
        restore(self.repo, f"E{n}", self.area, force=True)

    @rule(data=st.data(), force=st.booleans())
    def remove(self, data: st.DataObject, force: bool) -> None:
        nums = self.numbers()
        if len(nums) < 2:
            return
        n = data.draw(st.sampled_from(nums))
        before = refs_mod.read_refs(self.repo)
        try:
            res = rm(self.repo, [f"E{n}"], force=force)
        except UsageError:
            assert refs_mod.read_refs(self.repo).entries == before.entries
            event("rm refused")
            return
        event(f"rm rewrote {min(len(res.rewritten), 3)}+ entries")
        assert res.data_bytes == 0  # reshaping writes metadata only
        if res.anchored_blocks:
            event("rm anchored blocks")
        del self.states[n]

    @rule(
        data=st.data(),
        to=st.sampled_from(["full", "differential", "incremental"]),
        with_base=st.booleans(),
    )
    def reexpress(self, data: st.DataObject, to: str, with_base: bool) -> None:
        nums = self.numbers()
        # Mostly newer entries against older bases: the interesting, allowed cases.
        n = data.draw(st.sampled_from(nums[1:] or nums))
        older = [m for m in nums if m < n] or nums
        base = f"E{data.draw(st.sampled_from(older))}" if with_base and to != "full" else None
        before = refs_mod.read_refs(self.repo)
        try:
            res = convert(self.repo, f"E{n}", to, base=base)
        except UsageError:
            assert refs_mod.read_refs(self.repo).entries == before.entries
            event("convert refused")
            return
        event(f"convert to {to}" if res.changed else "convert: nothing to do")

    @rule(last=st.integers(1, 4))
    def prune_some(self, last: int) -> None:
        res = prune(self.repo, Policy(last=last))
        if res.rm is not None:
            for e in res.rm.removed:
                del self.states[int(e[1:])]

    @precondition(lambda self: self.checks < 3)
    @rule()
    def collect(self) -> None:
        gc(self.repo)

    @rule()
    def check_everything(self) -> None:
        self.checks += 1
        assert set(self.numbers()) == set(self.states)
        entries = set(refs_mod.read_refs(self.repo).entries.values())
        reader = PackReader(self.repo)
        try:
            for c in entries:  # no entry's parent is left without a name
                parent = commit_tree_parent(reader, c)[1]
                assert parent is None or parent in entries
        finally:
            reader.close()
        for n in self.numbers():
            out = self.tmp / f"co-{n}-{self.checks}"
            checkout(self.repo, f"E{n}", out)
            assert snapshot(out) == self.states[n], f"E{n} changed"
            shutil.rmtree(out)
        res = verify(self.repo, [], all_entries=True, read_data=True)
        assert res.clean, res.problems
        assert fsck(self.repo).clean
        git = subprocess.run(
            ["git", "fsck", "--full", "--strict"], cwd=self.repo.path, capture_output=True
        )
        assert git.returncode == 0, git.stderr


Forest.TestCase.settings = settings(
    max_examples=int(os.environ.get("VML_FOREST_EXAMPLES", "12")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_forest_reshape = Forest.TestCase
