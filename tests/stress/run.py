#!/usr/bin/env python3
"""Crash stress: start vml commands, SIGKILL them at random moments, check nothing is lost.

Run by hand (from the repository root)::

    python3 tests/stress/run.py --trials 200            # the full run (issue 5)
    python3 tests/stress/run.py --trials 20 --seed 20240501  # what CI runs (tests/stress/test_stress.py)

Each trial picks a command, changes the world a little (edits the area before
a commit, picks an entry and an area for a checkout), starts ``python3 -m vml
...`` as a child process and kills it with SIGKILL after a random delay drawn
between the interpreter's start-up time and the command's full duration
(measured once per command), so most kills land inside the command's work.
After every trial:

- ``git fsck --full --strict`` (and ``vml fsck`` once that command exists)
  must be clean;
- the entries committed so far are checked out into a fresh folder and
  compared byte for byte with what the area held when they were saved (the
  newest entries and a random sample every trial, all of them every
  ``--full-every`` trials and at the end);
- the area the command worked on is in its old state, its new state, or its
  ``.vml/area.json`` names a ``pending`` checkout and ``vml status`` says so;
  then ``vml checkout <pending>`` must finish it exactly.

Commands are plug-ins (:class:`Plugin`); one is used only when ``vml --help``
lists it, so ``rm``, ``convert`` and ``gc`` join the run as they land.
Exit status 0 when every trial passed; the first failure stops the run and
keeps its folder (``--keep`` keeps it in any case).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 64 << 10
Digest = dict[str, tuple[str, bool]]  # path -> (sha256, exec bit)


class StressFailure(AssertionError):
    """A guarantee did not hold."""


def digest(folder: Path) -> Digest:
    """Every regular file below ``folder`` except ``.vml``: content hash and exec bit."""
    out: Digest = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not (Path(root) == folder and d == ".vml"))
        for name in names:
            p = Path(root) / name
            st = p.lstat()
            h = hashlib.sha256(p.read_bytes()).hexdigest()
            out[p.relative_to(folder).as_posix()] = (h, bool(st.st_mode & 0o111))
    return out


@dataclass
class World:
    """The repository, the areas, and what every entry must check out as."""

    base: Path
    rng: random.Random
    env: dict[str, str]
    repo: Path = field(init=False)
    work: Path = field(init=False)
    expected: dict[str, Digest] = field(default_factory=dict)  # commit hex -> content
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.repo = self.base / "repo"
        self.work = self.base / "work area é"  # spaces and unicode on purpose

    def vml(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run vml to completion."""
        res = subprocess.run(
            [sys.executable, "-m", "vml", "-R", str(self.repo), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise StressFailure(
                f"vml {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}"
            )
        return res

    def entries(self) -> dict[int, str]:
        """E-number -> commit hex, from git itself."""
        res = subprocess.run(
            [
                "git",
                "-C",
                str(self.repo),
                "for-each-ref",
                "--format=%(refname) %(objectname)",
                "refs/vml/entries/",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out = {}
        for line in res.stdout.split("\n"):
            if line:
                ref, sha = line.split()
                out[int(ref.rsplit("/", 1)[1])] = sha
        return out

    def state(self, area: Path) -> dict[str, object] | None:
        """An area's ``area.json`` (None when it has none)."""
        try:
            doc: dict[str, object] = json.loads((area / ".vml" / "area.json").read_text())
        except FileNotFoundError:
            return None
        return doc


# -- mutations of the work area, so that commits have something to save --


def mutate(w: World) -> None:
    """Change the work area a little: disk pages, whole blocks, size, small files."""
    rng = w.rng
    disk = w.work / "disk.img"
    size = disk.stat().st_size
    with open(disk, "r+b") as f:
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.5:  # a few pages (deltas)
                off = rng.randrange(0, max(1, size - 4096)) & ~4095
                f.seek(off)
                f.write(rng.randbytes(rng.choice([512, 4096, 8192])))
            elif kind < 0.8:  # whole blocks
                off = rng.randrange(0, max(1, size - BLOCK)) & ~(BLOCK - 1)
                f.seek(off)
                f.write(rng.randbytes(BLOCK * rng.randint(1, 4)))
            elif kind < 0.9:  # zero a block
                off = rng.randrange(0, max(1, size - BLOCK)) & ~(BLOCK - 1)
                f.seek(off)
                f.write(bytes(BLOCK))
            else:  # grow or shrink
                f.truncate(max(BLOCK, size + rng.choice([-1, 1]) * rng.randint(1, 8) * 4096))
    small = w.work / "notes dir ü" / f"file {rng.randint(0, 5)}.txt"
    if rng.random() < 0.5:
        small.parent.mkdir(exist_ok=True)
        small.write_bytes(rng.randbytes(rng.randint(0, 3000)))
    elif small.exists():
        small.unlink()
    if rng.random() < 0.2:
        nv = w.work / "vm.nvram"
        nv.chmod(nv.stat().st_mode ^ 0o100)


# -- plug-ins: one per command --


@dataclass
class Trial:
    """One run of a command, and what the check needs to know about it."""

    argv: list[str]
    check: Callable[[int], None]  # called with the return code (-9 when killed)
    area: Path | None = None


class Plugin:
    """A vml command the stress run knows how to start and check."""

    name = ""
    weight = 1.0
    # Exit codes that are not failures: 1 = nothing to commit.
    ok_codes: tuple[int, ...] = (1,)

    def available(self, commands: set[str]) -> bool:
        return self.name in commands

    def prepare(self, w: World) -> Trial | None:  # None: nothing to do this time
        raise NotImplementedError


class CommitPlugin(Plugin):
    name = "commit"
    weight = 3.0

    def prepare(self, w: World) -> Trial | None:
        if w.state(w.work) and w.state(w.work).get("pending"):  # type: ignore[union-attr]
            return None
        mutate(w)
        snap = digest(w.work)
        before = w.entries()
        old_state = w.state(w.work)
        kind = w.rng.choice(["--incremental", "--incremental", "--differential", "--full"])

        def check(rc: int) -> None:
            after = w.entries()
            new = {n: c for n, c in after.items() if n not in before}
            if any(before[n] != after.get(n) for n in before):
                raise StressFailure("an existing entry ref moved or vanished during a commit")
            if rc == 0 and len(new) != 1:
                raise StressFailure(f"a finished commit made {len(new)} entries")
            if len(new) > 1:
                raise StressFailure("one commit made several entries")
            for c in new.values():
                w.expected[c] = snap
            st = w.state(w.work)
            old_entry = old_state.get("entry") if old_state else None
            allowed = {old_entry, *new.values()}
            if st is None:
                if old_state is not None:
                    raise StressFailure("area.json vanished during a commit")
            elif st.get("entry") not in allowed:
                raise StressFailure(f"area.json names {st.get('entry')}, neither old nor new")
            if digest(w.work) != snap:
                raise StressFailure("a commit changed the area's files")
            w.vml("status", str(w.work))

        if not w.expected:
            kind = "--full"
        return Trial(["commit", "-q", "-m", "stress", kind, str(w.work)], check, w.work)


class CheckoutPlugin(Plugin):
    name = "checkout"
    weight = 3.0

    def prepare(self, w: World) -> Trial | None:
        if not w.expected:
            return None
        entries = w.entries()
        commit = w.rng.choice(sorted(entries.values()))
        n = next(k for k, v in entries.items() if v == commit)
        choice = w.rng.random()
        if choice < 0.3:
            area = w.work
            args = ["-f"]  # the work area may hold unsaved edits
        else:
            area = w.base / f"other {w.rng.randint(1, 2)}"
            args = []
        old_state = w.state(area)
        old_files = digest(area) if area.exists() else {}

        def check(rc: int) -> None:
            st = w.state(area)
            if rc == 0 and (st is None or st.get("entry") != commit or st.get("pending")):
                raise StressFailure("a finished checkout left the area not at its entry")
            # Paths VML put in the area: the entry it held, the one this checkout
            # wrote, and any a resumed checkout wrote.  A forced checkout leaves
            # every other file as it was.
            claimed = set(w.expected.get(str((old_state or {}).get("entry")), {}))
            claimed |= set(w.expected.get(str((old_state or {}).get("pending")), {}))
            claimed |= set(w.expected.get(commit, {}))
            if st is not None and st.get("pending"):
                pending = str(st["pending"])
                res = w.vml("status", str(area), check=False)
                if "interrupted checkout" not in res.stdout:
                    raise StressFailure(
                        f"status does not report the interrupted checkout: {res.stdout}"
                    )
                res = w.vml("commit", "-q", str(area), check=False)
                if res.returncode == 0 or "interrupted" not in res.stderr:
                    raise StressFailure(
                        "commit did not refuse an area with an interrupted checkout"
                    )
                # Finish it: resume the same entry, or (sometimes) redo another one.
                target = pending if w.rng.random() < 0.7 else w.rng.choice(sorted(w.expected))
                claimed |= set(w.expected.get(pending, {})) | set(w.expected.get(target, {}))
                # With the original options: a forced checkout resumes forced.
                w.vml("checkout", "-q", *args, target, str(area))
                st = w.state(area)
                assert st is not None
                if st.get("pending") or st.get("entry") != target:
                    raise StressFailure("resuming the checkout did not finish it")
            if st is None or st.get("entry") is None:
                # Killed before the area was marked: it must not have been touched.
                now = digest(area) if area.exists() else {}
                if now != old_files:
                    raise StressFailure("an unmarked area changed")
                return
            entry = str(st["entry"])
            old_entry = old_state.get("entry") if old_state else None
            got = digest(area)
            if entry == old_entry and got == old_files:
                return  # untouched
            left = {p: v for p, v in old_files.items() if p not in claimed}
            if got != {**left, **w.expected[entry]}:
                raise StressFailure(
                    f"area {area.name} claims entry {entry[:12]} but its files differ: "
                    f"{sorted(set(got.items()) ^ set(w.expected[entry].items()))[:4]}"
                )

        return Trial(["checkout", "-q", *args, f"E{n}", str(area)], check, area)


class GcPlugin(Plugin):
    """``vml gc`` (when it exists): must never lose an entry."""

    name = "gc"
    weight = 1.0

    def prepare(self, w: World) -> Trial | None:
        before = w.entries()

        def check(rc: int) -> None:
            if w.entries() != before:
                raise StressFailure("gc changed the entry refs")

        return Trial(["gc"], check)


class RmPlugin(Plugin):
    """``vml rm`` (when it exists): removes one entry or nothing; never another."""

    name = "rm"
    weight = 0.5

    def prepare(self, w: World) -> Trial | None:
        entries = w.entries()
        if len(entries) < 4:
            return None
        held = {str((w.state(a) or {}).get("entry")) for a in w.base.iterdir() if a.is_dir()}
        candidates = [n for n, c in entries.items() if c not in held]
        if not candidates:
            return None
        n = w.rng.choice(candidates)

        def check(rc: int) -> None:
            after = w.entries()
            gone = set(entries) - set(after)
            if not gone <= {n}:
                raise StressFailure(f"rm E{n} removed {sorted(gone)}")
            if rc not in (0, -signal.SIGKILL) and gone:
                raise StressFailure("a failed rm removed its entry")
            if n in gone:
                w.expected.pop(entries[n], None)
            # rm moves the children onto the parent: same E-number and content, new commit.
            for m, c in after.items():
                if m in entries and entries[m] != c:
                    w.expected[c] = w.expected.pop(entries[m])

        return Trial(["rm", f"E{n}"], check)


class ConvertPlugin(Plugin):
    """``vml convert``: an entry changes shape, never content; no entry goes or comes."""

    name = "convert"
    weight = 0.5
    # 2: a conversion that makes no sense for the entry drawn (e.g. "incremental"
    # for an area's first entry) is refused; the check sees that nothing moved.
    ok_codes = (2,)

    def prepare(self, w: World) -> Trial | None:
        entries = w.entries()
        if len(entries) < 3:
            return None
        n = w.rng.choice(sorted(entries))
        to = w.rng.choice(["full", "differential", "incremental"])

        def check(rc: int) -> None:
            after = w.entries()
            if set(after) != set(entries):
                raise StressFailure(f"convert E{n} changed the set of entries")
            # Converted entries and their descendants get new commits with the same content.
            for m, c in after.items():
                if entries[m] != c:
                    w.expected[c] = w.expected.pop(entries[m])

        return Trial(["convert", f"E{n}", "--to", to], check)


PLUGINS: list[Plugin] = [CommitPlugin(), CheckoutPlugin(), GcPlugin(), RmPlugin(), ConvertPlugin()]


# -- checks after every trial --


def git_fsck(w: World) -> None:
    res = subprocess.run(
        ["git", "-C", str(w.repo), "fsck", "--full", "--strict", "--no-progress"],
        capture_output=True,
        text=True,
    )
    bad = [
        ln
        for ln in res.stderr.splitlines()
        if ln and not ln.startswith(("dangling", "Checking", "notice:"))
    ]
    if res.returncode != 0 or bad:
        raise StressFailure(f"git fsck failed ({res.returncode}): {res.stderr.strip()[:500]}")


def verify_entries(w: World, commits: list[str]) -> None:
    """Check these entries out into a fresh folder, in process, and compare."""
    from vml.plumbing.repository import open_repository
    from vml.porcelain.checkout import checkout

    repo = open_repository(w.repo)
    try:
        for c in commits:
            dest = Path(tempfile.mkdtemp(prefix="verify-", dir=w.base / "scratch"))
            checkout(repo, c, dest / "a")
            if digest(dest / "a") != w.expected[c]:
                raise StressFailure(f"entry {c[:12]} does not check out as it was saved")
            shutil.rmtree(dest)
    finally:
        repo.close()


# Exit codes a command may give when another one ran beside it: 8, the
# repository or area was busy or changed under it (it changed nothing).
CONCURRENT_CODES = (8,)


def check_pair(w: World, before: dict[int, str], saved: bool, areas: list[Path]) -> None:
    """After two commands ran at once: the forest is whole, areas are sound, content kept.

    The commands' own checks assume they ran alone; here what must hold
    whatever ran beside what: entries rewritten in place (same E-number)
    keep their content, a new E-number comes from a save and verifies (what
    it holds depends on which of the two got the area first), every entry's
    parent is an entry, and an area either holds an entry or names a
    pending checkout that finishes.
    """
    after = w.entries()
    for n, c in after.items():
        if n in before and before[n] != c and before[n] in w.expected:
            w.expected[c] = w.expected[before[n]]
        elif n not in before:
            if not saved:
                raise StressFailure(f"E{n} appeared, but no commit ran")
            w.vml("verify", "--read-data", f"E{n}")
            dest = Path(tempfile.mkdtemp(prefix="pair-", dir=w.base / "scratch")) / "a"
            w.vml("checkout", "-q", c, str(dest))
            w.expected[c] = digest(dest)
            shutil.rmtree(dest.parent)
    live = set(after.values())
    for c in list(w.expected):
        if c not in live:
            del w.expected[c]
    res = subprocess.run(
        ["git", "-C", str(w.repo), "log", "--format=%H %P", "--no-walk", *live],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in res.stdout.splitlines():
        commit, *parents = line.split()
        if any(p not in live for p in parents):
            raise StressFailure(f"entry {commit[:12]} has a parent no entry names")
    for area in areas:
        st = w.state(area)
        if st is None:
            continue
        if st.get("pending"):
            w.vml("checkout", "-q", "-f", str(st["pending"]), str(area))
            st = w.state(area)
            assert st is not None
        entry = st.get("entry")
        if entry is not None and entry not in live:
            raise StressFailure(f"area {area.name} holds {str(entry)[:12]}, which no entry names")


def _pending(w: World, area: Path) -> bool:
    st = w.state(area)
    return bool(st and st.get("pending"))


def _wait_for_lock(proc: subprocess.Popen[str], area: Path) -> float:
    """When ``proc`` took the area lock (or ended); polls the lock file for its pid."""
    lock = area / ".vml" / "lock"
    want = f"{proc.pid}\n".encode()
    while proc.poll() is None:
        try:
            if lock.read_bytes() == want:
                break
        except OSError:
            pass
        time.sleep(0.001)
    return time.monotonic()


def run(
    trials: int,
    seed: int,
    base: Path,
    full_every: int,
    only: set[str] | None,
    out: Callable[[str], None],
    pairs: float = 0.25,
) -> dict[str, int]:
    rng = random.Random(seed)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("VML_REPO", None)
    w = World(base, rng, env)
    (base / "scratch").mkdir(parents=True)
    help_text = w.vml("--help").stdout
    commands = {
        ln.split()[1]
        for ln in help_text.splitlines()
        if ln.startswith("│ ") and len(ln.split()) > 1
    }
    plugins = [p for p in PLUGINS if p.available(commands) and (only is None or p.name in only)]
    out(f"commands: {', '.join(p.name for p in plugins)} (seed {seed}, folder {base})")
    w.vml("init", "--block-size", "64K", str(w.repo))
    # Saves roll small packs up past 4 packs, so kills land in consolidations too.
    subprocess.run(["git", "config", "vml.autoPackLimit", "4"], cwd=w.repo, check=True)
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_area

    make_area(w.work, disk=6 << 20, seed=seed)
    with open(w.work / "disk.img", "r+b") as f:
        f.seek(1 << 20)
        f.write(rng.randbytes(3 << 20))
    w.vml("commit", "-q", "--full", str(w.work))
    w.expected[w.entries()[1]] = digest(w.work)

    # How long does each command take, and Python to start?  Kills land between.
    t = time.monotonic()
    w.vml("--version")
    startup = time.monotonic() - t
    durations: dict[str, float] = {}
    stats = {"trials": 0, "killed": 0, "finished": 0, "pending_resumed": 0, "pairs": 0}
    # Some draws find nothing to do (rm with one entry left, a pair of which
    # one cannot start): draw again, so that ``trials`` trials run whatever
    # the timing of the kills made of the repository.
    for i in range(trials * 4):
        if stats["trials"] >= trials:
            break
        weights = [p.weight for p in plugins]
        plugin = rng.choices(plugins, weights)[0]
        if rng.random() < pairs:
            if run_pair(w, plugins, durations, rng, out, i):
                stats["trials"] += 1
                stats["pairs"] += 1
            continue
        trial = plugin.prepare(w)
        if trial is None:
            continue
        t = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vml", "-R", str(w.repo), *trial.argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Python's start-up is no interesting moment: when the command works
        # on an area, wait until it holds the area lock (the lock file names
        # its pid), then kill it somewhere inside its measured working time.
        started = _wait_for_lock(proc, trial.area) if trial.area else t + startup
        work = durations.get(plugin.name)
        kill_at = 600.0 if work is None else rng.uniform(0, work)
        try:
            _, err = proc.communicate(timeout=max(0.0, started + kill_at - time.monotonic()))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate()
            rc = proc.returncode
        took = time.monotonic() - t
        if rc == 0:  # follow the command's real duration (caches warm up, the machine is busy)
            d = durations.get(plugin.name)
            now = time.monotonic() - started
            durations[plugin.name] = now if d is None else 0.7 * d + 0.3 * now
        if rc not in (0, -signal.SIGKILL, *plugin.ok_codes):
            raise StressFailure(
                f"trial {i}: vml {' '.join(trial.argv)} failed ({rc}): {err.strip()}"
            )
        pending_before = stats["pending_resumed"]
        st_before = w.state(trial.area) if trial.area else None
        if st_before and st_before.get("pending"):
            stats["pending_resumed"] += 1
        trial.check(rc)
        git_fsck(w)
        if "fsck" in commands:
            w.vml("fsck")
        commits = sorted(w.expected)
        newest = [w.entries()[n] for n in sorted(w.entries())[-2:]]
        sample = newest + rng.sample(commits, min(2, len(commits)))
        if full_every and (i + 1) % full_every == 0:
            sample = commits
        verify_entries(w, sorted(set(sample) & set(commits)))
        stats["trials"] += 1
        stats["killed" if rc == -signal.SIGKILL else "finished"] += 1
        mark = " (resumed)" if stats["pending_resumed"] > pending_before else ""
        out(
            f"trial {i + 1:3d}: {plugin.name:<8} {'killed' if rc < 0 else f'rc {rc}':<7} "
            f"after {took:5.2f} s{mark}"
        )
    verify_entries(w, sorted(w.expected))
    stats["entries"] = len(w.entries())
    return stats


def _held(w: World) -> set[str]:
    """The commits the areas hold now."""
    return {str((w.state(a) or {}).get("entry")) for a in w.base.iterdir() if a.is_dir()}


def run_pair(
    w: World,
    plugins: list[Plugin],
    durations: dict[str, float],
    rng: random.Random,
    out: Callable[[str], None],
    i: int,
) -> bool:
    """Start two commands at once on the same repository (and often the same area).

    The second starts a moment after the first; one of them is sometimes
    killed.  Each must finish, be killed, or refuse (exit 8) having changed
    nothing; then :func:`check_pair`.
    """
    before = w.entries()
    a_plugin, b_plugin = rng.sample(plugins, 2)
    trials = [a_plugin.prepare(w), b_plugin.prepare(w)]
    if any(t is None for t in trials):
        return False
    procs = []
    for trial in trials:
        assert trial is not None
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "vml", "-R", str(w.repo), *trial.argv],
                env=w.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        time.sleep(rng.uniform(0, 0.3))
    victim = rng.choice([None, 0, 1])
    if victim is not None:
        work = max(0.05, durations.get((a_plugin, b_plugin)[victim].name, 0.5))
        time.sleep(rng.uniform(0, work))
        if procs[victim].poll() is None:
            procs[victim].send_signal(signal.SIGKILL)
    errs = [proc.communicate(timeout=300)[1] for proc in procs]
    codes = []
    after = w.entries()
    killed = any(proc.returncode == -signal.SIGKILL for proc in procs)
    for proc, err, plugin, trial in zip(procs, errs, (a_plugin, b_plugin), trials, strict=True):
        rc = proc.returncode
        assert trial is not None
        # Exit 4: the entry it names was removed or rewritten by the other one.
        named = [int(a[1:]) for a in trial.argv if a[:1] == "E" and a[1:].isdigit()]
        gone = any(before.get(n) != after.get(n) for n in named)
        # Exit 5: the other one, a checkout into the same area, was killed
        # before this one took the area, which names the checkout to finish.
        interrupted = killed and trial.area is not None and _pending(w, trial.area)
        # Exit 2 of rm: the other one checked the entry out meanwhile, and
        # an entry an area holds is removed only with --force.
        held = plugin.name == "rm" and any(after.get(n) in _held(w) for n in named)
        if rc not in (0, -signal.SIGKILL, *plugin.ok_codes, *CONCURRENT_CODES) and not (
            (rc == 4 and gone) or (rc == 5 and interrupted) or (rc == 2 and held)
        ):
            raise StressFailure(f"trial {i}: {plugin.name} beside another failed ({rc}): {err}")
        codes.append(rc)
    areas = [a for a in w.base.iterdir() if a.is_dir() and a.name not in ("repo", "scratch")]
    check_pair(w, before, "commit" in (a_plugin.name, b_plugin.name), areas)
    git_fsck(w)
    verify_entries(w, sorted(w.expected))
    out(
        f"trial {i + 1:3d}: {a_plugin.name} + {b_plugin.name}: "
        + ", ".join("killed" if c < 0 else f"rc {c}" for c in codes)
    )
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--full-every", type=int, default=20, help="verify every entry this often")
    ap.add_argument("--only", help="comma-separated commands to stress (default: all available)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--pairs", type=float, default=0.25, help="share of trials running two commands at once"
    )
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    base = Path(tempfile.mkdtemp(prefix="vml-stress-"))
    only = set(args.only.split(",")) if args.only else None
    try:
        stats = run(args.trials, seed, base / "w", args.full_every, only, print, args.pairs)
    except StressFailure as e:
        print(f"FAIL (seed {seed}, kept {base}): {e}", file=sys.stderr)
        return 1
    print(f"PASS: {stats}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
