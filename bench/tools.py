"""One runner per compared tool: initialise a repository, save a state, restore it, size it.

Every runner saves the *contents* of the area (not the area's absolute path)
where the tool allows it, excluding VML's own ``.vml/`` folder, and :func:`bench.workload.find_area_root` locates the
restored files wherever a tool puts them, so all restores are compared file by
file with the same relative names.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path

from bench.measure import DiskUsage, Measurement, disk_usage, run_measured
from bench.workload import VML_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent


def _sum_known(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v or 0 for v in values)


def _combine(*steps: Measurement) -> Measurement:
    """One logical operation made of several commands: times and bytes add, peaks max."""
    return Measurement(
        seconds=sum(s.seconds for s in steps),
        peak_rss=max(s.peak_rss for s in steps),
        stdout="".join(s.stdout for s in steps),
        sync_seconds=sum(s.sync_seconds for s in steps),
        read_chars=_sum_known([s.read_chars for s in steps]),
        read_bytes=_sum_known([s.read_bytes for s in steps]),
        orphans=sum(s.orphans for s in steps),
        orphans_peak_rss=max(s.orphans_peak_rss for s in steps),
    )


class Tool(ABC):
    """A versioning or backup tool under test.

    ``repo`` is where the tool keeps its repository (measured for size);
    ``home`` is for caches and configuration, kept apart so that they are not
    counted as repository bytes.
    """

    name: str = ""

    restores_holes: bool = True
    """Whether its restore can leave holes where the saved file had them (W2 asks)."""

    def __init__(self, repo: Path, home: Path) -> None:
        self.repo = repo
        self.home = home
        # state number -> the tool's handle for it (entry id, snapshot id, path)
        self.handles: dict[int, str] = {}
        # W2 sets these: count the bytes each command reads (measure.py), and
        # restore sparse files sparse where the tool needs to be told so.
        self.measure_io = False
        self.sparse = False

    def env(self) -> dict[str, str]:
        """Environment variables the tool's commands need."""
        return {}

    def measured(
        self, cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> Measurement:
        """``run_measured`` with this tool's environment and I/O counting."""
        return run_measured(
            cmd, cwd=cwd, env=self.env() if env is None else env, io=self.measure_io
        )

    @abstractmethod
    def init(self) -> None:
        """Create an empty repository at ``self.repo``."""

    @abstractmethod
    def save(self, area: Path, state: int) -> Measurement:
        """Save the area as ``state``; remember the handle to restore it."""

    @abstractmethod
    def restore(self, state: int, dest: Path) -> Measurement:
        """Restore ``state`` under ``dest`` (which exists and is empty)."""

    def size(self) -> DiskUsage:
        """Bytes the repository takes on disk."""
        return disk_usage(self.repo)


class VmlTool(Tool):
    """VML itself, run from the source tree as ``python -m vml``."""

    name = "vml"

    src: Path = REPO_ROOT
    """Folder holding the ``vml`` package to run (``--vml-src``: e.g. an exported commit)."""

    def __init__(self, repo: Path, home: Path) -> None:
        super().__init__(repo, home)
        self.area: Path | None = None

    def env(self) -> dict[str, str]:
        # Works without installing the package: the source folder is importable.
        path = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": f"{self.src}{os.pathsep}{path}" if path else str(self.src)}

    def run(self, *args: str) -> Measurement:
        """Run ``vml --repo REPO ARGS``, measured."""
        # cwd too: ``python -m`` puts the cwd first on sys.path, and a vml
        # folder there would shadow the chosen source.
        return self.measured(
            [sys.executable, "-m", "vml", "--repo", str(self.repo), *args], cwd=self.src
        )

    def init(self) -> None:
        # Compile the package's bytecode first, as installing it with pip
        # does (and as Debian does for the peers): otherwise, where
        # PYTHONDONTWRITEBYTECODE is set, every command would compile VML
        # from source again (~45 ms), a cost no installed copy pays.
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(self.src / "vml")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.run("init")

    def save(self, area: Path, state: int, *, full: bool = False) -> Measurement:
        # Not -q, which prints nothing since #13 (no bar is drawn without a terminal):
        # every VML version prints the entry id first then.
        args = ["commit", str(area), "-m", f"state {state}"]
        if full:
            # A full entry of an unchanged state is still wanted (chain test).
            args += ["--full", "--allow-empty"]
        m = self.run(*args)
        # The id comes first (``E3``); a summary line may follow it.
        found = re.search(r"\bE\d+\b", m.stdout)
        if not found:
            raise RuntimeError(f"vml commit printed no entry id: {m.stdout[:200]!r}")
        self.handles[state] = found.group(0)
        self.area = area
        return m

    def restore(self, state: int, dest: Path) -> Measurement:
        # vml creates DEST itself; give it a fresh child so it can.
        return self.run("checkout", self.handles[state], str(dest / "area"), "-q")

    def size(self) -> DiskUsage:
        """The repository plus the block cache VML keeps in the area: both are its cost."""
        repo = disk_usage(self.repo)
        cache = self.area / VML_DIR if self.area else None
        if cache is None or not cache.exists():
            return repo
        extra = disk_usage(cache)
        return DiskUsage(repo.allocated + extra.allocated, repo.apparent + extra.apparent)

    def log(self) -> list[dict[str, object]]:
        """The repository's entries (``id``, ``kind``, ``parent``, ``stored_bytes``)."""
        entries: list[dict[str, object]] = json.loads(self.run("log", "--json").stdout)
        return entries


class BorgTool(Tool):
    """BorgBackup 1.2, unencrypted, lz4 (its usual fast setting)."""

    name = "borg"

    def env(self) -> dict[str, str]:
        return {
            "BORG_PASSPHRASE": "",
            "BORG_BASE_DIR": str(self.home),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def init(self) -> None:
        self.measured(["borg", "init", "-e", "none", str(self.repo)])

    def save(self, area: Path, state: int) -> Measurement:
        name = f"s{state}"
        # cd into the area and save "." so the archive holds relative names.
        m = self.measured(
            [
                "borg",
                "create",
                "--compression",
                "lz4",
                "--exclude",
                f"pp:{VML_DIR}",
                f"{self.repo}::{name}",
                ".",
            ],
            cwd=area,
        )
        self.handles[state] = name
        return m

    def restore(self, state: int, dest: Path) -> Measurement:
        return self.measured(
            ["borg", "extract", "--sparse", f"{self.repo}::{self.handles[state]}"], cwd=dest
        )


@functools.cache
def _restic_has_sparse_restore() -> bool:
    try:
        done = subprocess.run(
            ["restic", "restore", "--help"], capture_output=True, text=True, check=False
        )
    except OSError:
        return False
    return "--sparse" in done.stdout


class ResticTool(Tool):
    """restic with its default repository format (v2, compression auto)."""

    name = "restic"

    @property
    def restores_holes(self) -> bool:  # type: ignore[override]
        """restic 0.14 writes holes as zeros; later versions have ``restore --sparse``."""
        return _restic_has_sparse_restore()

    def env(self) -> dict[str, str]:
        return {
            "RESTIC_PASSWORD": "x",
            "RESTIC_REPOSITORY": str(self.repo),
            "RESTIC_CACHE_DIR": str(self.home / "cache"),
        }

    def init(self) -> None:
        self.measured(["restic", "init"])

    def save(self, area: Path, state: int) -> Measurement:
        m = self.measured(
            ["restic", "backup", "--json", "--exclude", VML_DIR, "--tag", f"s{state}", "."],
            cwd=area,
        )
        # --json prints progress lines then one summary with the snapshot id.
        snapshot = None
        for line in m.stdout.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("message_type") == "summary":
                snapshot = str(msg["snapshot_id"])
        if snapshot is None:
            raise RuntimeError("restic backup printed no snapshot id")
        self.handles[state] = snapshot
        return m

    def restore(self, state: int, dest: Path) -> Measurement:
        # restic keeps the absolute path of "."; find_area_root copes with it.
        sparse = ["--sparse"] if self.sparse and self.restores_holes else []
        return self.measured(
            ["restic", "restore", *sparse, self.handles[state], "--target", str(dest)]
        )


class BupTool(Tool):
    """bup: git packfiles with rolling-hash splitting; one branch per state."""

    name = "bup"

    def env(self) -> dict[str, str]:
        return {"BUP_DIR": str(self.repo)}

    def init(self) -> None:
        self.measured(["bup", "init"])

    def save(self, area: Path, state: int) -> Measurement:
        name = f"s{state}"
        # A save is "index then save": both are what a user runs, both count.
        index = self.measured(["bup", "index", "--exclude", str(area / VML_DIR), str(area)])
        save = self.measured(["bup", "save", "-n", name, f"--strip-path={area}", str(area)])
        self.handles[state] = name
        return _combine(index, save)

    def restore(self, state: int, dest: Path) -> Measurement:
        # The trailing "/." restores the saved tree's contents, not the dir.
        sparse = ["--sparse"] if self.sparse else []
        return self.measured(
            ["bup", "restore", "-q", *sparse, "-C", str(dest), f"/{self.handles[state]}/latest/."]
        )


class CopyTool(Tool):
    """The baseline a user starts with: a sparse copy of the whole area per state."""

    name = "cp"

    def init(self) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)

    def save(self, area: Path, state: int) -> Measurement:
        target = self.repo / f"s{state}"
        target.mkdir()
        # cp has no exclude: name the area's entries, all but VML's folder.
        entries = sorted(str(p) for p in area.iterdir() if p.name != VML_DIR)
        m = self.measured(["cp", "-r", "--sparse=always", *entries, str(target)])
        self.handles[state] = str(target)
        return m

    def restore(self, state: int, dest: Path) -> Measurement:
        return self.measured(
            ["cp", "-r", "--sparse=always", self.handles[state], str(dest / "area")]
        )


TOOLS: dict[str, type[Tool]] = {
    t.name: t for t in (VmlTool, BorgTool, BupTool, ResticTool, CopyTool)
}
"""Runner classes by the name used in ``--tools``."""
