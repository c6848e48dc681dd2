"""Workload W2: a real Linux guest on a 64 GiB sparse disk, saved at rest by every tool.

For each disk format (qcow2, raw), in its own area (``SCRATCH/w2-FMT/physics``):

1. the guest's disk (``bench/w2guest.py``): ext4 of ~512 MiB of real files on
   a sparse disk of 64 GiB; ``vml vm init`` describes it with 256 MiB of RAM
   in ``physics.ram``; with ``--w2-rest save`` the guest boots once and is
   saved with ``vml stop --save`` (state 1 then holds its RAM and device
   state), with ``off`` state 1 is the disk as made;
2. N work sessions done by the guest, the VM at rest between them: ``vml
   run`` (resumes), a press of the power button starts the session, ``vml
   stop --save`` when it is done (``off``: ``vml run`` boots, the guest does
   one session and powers off);
3. after every session (and for state 1) every tool saves the area, each
   save measured: time, peak RSS, bytes its process tree read
   (``/proc/PID/io``, ``bench/measure.py``), repository size; and the host
   measures what the guest changed (``bench/sparse.py``): the disk's 64 KiB
   guest clusters that differ from the previous state, the RAM file's 4 KiB
   pages that differ, and other files that differ (whole);
4. every tool restores the first and the last state (``--restore-runs``
   rounds, fastest counts), checked byte for byte (digest over data, see
   ``sparse.py``) and for holes (no file takes more disk than saved);
5. VML alone: the same sessions saved *live* (``vml commit`` while the guest
   works: a copy of state 1, another repository), the pause read from the
   entry's ``vm.live.pause_seconds``; and the scale test: the same guest
   overwriting 16 MiB of a file on a 64 GiB and on a 2 GiB disk, each saved
   before and after, the later saves compared.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.measure import CommandError, Measurement, disk_usage, median
from bench.sparse import (
    FileFacts,
    area_digest,
    changed_bytes,
    copy_area,
    evict,
    guest_view,
    holes_lost,
    remove,
    same_content,
    warm,
)
from bench.tools import TOOLS, Tool, VmlTool
from bench.w2guest import NAME, GuestData, GuestVM, append_line, make_disk, make_tree

MIB = 1 << 20
SPARSE_LIMIT = 8 << 30
"""A tool that writes holes as zeros is not asked to restore a state of more apparent bytes."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class W2Params:
    """What W2 runs: sizes in MiB, sessions, formats, how the VM rests, the VML-only parts."""

    disk_mib: int = 65536
    fill_mib: int = 512
    ram_mib: int = 256
    sessions: int = 5
    formats: tuple[str, ...] = ("qcow2", "raw")
    rest: str = "save"  # save: vml stop --save between sessions; off: powered off
    scale_mib: int = 16  # 0: no scale test
    scale_small_mib: int = 2048
    live: bool = True
    accel: str | None = None
    seed: int = 1
    cold: bool = False  # evict the area's files from the page cache before each save
    keep: bool = False  # --keep: leave every tool's repository (all its states) in the scratch dir


class VmlW2Tool(VmlTool):
    """VML in W2: its size is the repository plus the area's ``.vml/cache`` (not ``.vml/run``)."""

    def cache_bytes(self) -> int:
        """Allocated bytes of ``AREA/.vml/cache``."""
        cache = self.area / ".vml" / "cache" if self.area else None
        return disk_usage(cache).allocated if cache and cache.exists() else 0

    def size(self) -> Any:
        repo = disk_usage(self.repo)
        return type(repo)(repo.allocated + self.cache_bytes(), repo.apparent)

    def restore(self, state: int, dest: Path) -> Measurement:
        return self.run("checkout", self.handles[state], str(dest / "area"), "-q")


def _tool(name: str, work: Path) -> Tool:
    cls = VmlW2Tool if name == "vml" else TOOLS[name]
    home = work / f"home-{name}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    tool = cls(work / f"repo-{name}", home)
    tool.measure_io = True
    tool.sparse = True
    return tool


def _area_root(dest: Path) -> Path | None:
    for p in sorted(dest.rglob(f"{NAME}.qemu.json")):
        return p.parent
    return None


# --- the guest's sessions and what they changed ------------------------------


class Sessions:
    """Drives the guest of one area through its states, and measures what each changed."""

    def __init__(self, vm: GuestVM, fmt: str, rest: str, refs: Path) -> None:
        self.vm, self.fmt, self.rest, self.refs = vm, fmt, rest, refs
        self.seen = 0

    def settle(self) -> None:
        """State 1: ``save``: booted, ready, saved with ``vml stop --save``; ``off``: as made."""
        if self.rest == "save":
            self.vm.start()
            self.seen, _ = self.vm.wait_mark(r"^ready")
            self.vm.save_and_stop()

    def session(self) -> str:
        """One work session by the guest; the VM at rest afterwards. Returns its marker."""
        self.vm.start()
        if self.rest == "save":
            self.vm.press()
        self.seen, done = self.vm.wait_mark(r"^session=\d+ done", self.seen)
        if self.rest == "save":
            self.vm.save_and_stop()
        else:
            self.vm.wait_off()
        return done

    def changes(self, state: int, facts: dict[str, FileFacts]) -> dict[str, int]:
        """Keep a reference copy of this state; return what changed since the previous one."""
        area = self.vm.area
        ref = self.refs / f"s{state}"
        copy_area(area, ref / "files")
        disk = f"disk.{self.fmt}"
        guest_view(area / disk, self.fmt, ref / "guest.raw")
        prev = self.refs / f"s{state - 1}"
        out: dict[str, int] = {}
        if prev.exists():
            out["disk_guest"] = changed_bytes(prev / "guest.raw", ref / "guest.raw")
            out["disk_file"] = changed_bytes(prev / "files" / disk, ref / "files" / disk)
            ram = f"{NAME}.ram"
            out["ram_pages"] = (
                changed_bytes(prev / "files" / ram, ref / "files" / ram, 4096)
                if (ref / "files" / ram).exists()
                else 0
            )
            old = {p.name for p in (prev / "files").iterdir()}
            out["other_files"] = sum(
                facts[n].size
                for n in facts
                if n not in (disk, ram)
                and (n not in old or changed_bytes(prev / "files" / n, ref / "files" / n) > 0)
            )
            out["guest_changed"] = out["disk_guest"] + out["ram_pages"] + out["other_files"]
            remove(prev)
        return out


def _written_kib(marker: str) -> int | None:
    m = re.search(r"written_kib=(\d+)", marker)
    return int(m.group(1)) if m else None


# --- saves and restores by every tool ----------------------------------------


def _save(tool: Tool, area: Path, state: int) -> dict[str, Any]:
    m = tool.save(area, state)
    du = tool.size()
    rec: dict[str, Any] = {
        "state": state,
        "seconds": m.seconds,
        "sync_seconds": m.sync_seconds,
        "peak_rss": m.peak_rss,
        "read_chars": m.read_chars,
        "read_bytes": m.read_bytes,
        "orphans": m.orphans,
        "orphans_peak_rss": m.orphans_peak_rss,
        "repo_allocated": du.allocated,
        "repo_apparent": du.apparent,
    }
    if isinstance(tool, VmlW2Tool):
        rec["cache_allocated"] = tool.cache_bytes()
        # The entry id, then the summary and its notes (which path the save took).
        rec["summary"] = " | ".join(m.stdout.strip().splitlines()[1:])
    return rec


def save_states(
    names: list[str], work: Path, sessions: Sessions, states: int, log: Log, cold: bool = False
) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Every state saved by every tool; per state, the area's facts and what changed."""
    tools = {n: _tool(n, work) for n in names}
    results: dict[str, dict[str, Any]] = {n: {"saves": [], "error": None} for n in names}
    for name, tool in tools.items():
        try:
            tool.init()
        except (CommandError, OSError, RuntimeError) as e:
            results[name]["error"] = f"init: {e}"
    area = sessions.vm.area
    per_state: dict[int, dict[str, Any]] = {}
    for state in range(1, states + 1):
        info: dict[str, Any] = {}
        if state > 1:
            log(f"W2 {sessions.fmt}: guest session {state - 1}")
            t0 = time.perf_counter()
            marker = sessions.session()
            info.update(
                session_seconds=time.perf_counter() - t0, guest_written_kib=_written_kib(marker)
            )
        facts = area_digest(area)
        info["facts"] = facts
        info["data_bytes"] = sum(f.data for f in facts.values())
        info["allocated_bytes"] = sum(f.allocated for f in facts.values())
        info["apparent_bytes"] = sum(f.size for f in facts.values())
        info["changed"] = sessions.changes(state, facts)
        per_state[state] = info
        for name, tool in tools.items():
            r = results[name]
            if r["error"]:
                continue
            log(f"W2 {sessions.fmt} state {state}: {name} save")
            try:
                if cold:
                    evict(area)
                else:
                    warm(area)  # bup evicts what it read; nobody inherits that
                r["saves"].append(_save(tool, area, state))
            except (CommandError, OSError, RuntimeError) as e:
                r["error"] = f"save {state}: {e}"
    for name in names:
        results[name]["_tool"] = tools[name]
    return results, per_state


def restore_states(
    results: dict[str, dict[str, Any]],
    per_state: dict[int, dict[str, Any]],
    last: int,
    dest: Path,
    runs: int,
    log: Log,
) -> None:
    """Restore the first and last state with every tool, ``runs`` rounds; check bytes and holes."""
    order = [n for n in results if not results[n]["error"]]
    for rnd in range(runs if order else 0):
        # Each round starts with another tool, as in W1 (see BENCHMARKS.md).
        for name in order[rnd % len(order) :] + order[: rnd % len(order)]:
            r = results[name]
            tool: Tool = r["_tool"]
            if r["error"]:
                continue
            r.setdefault("restore_peak_rss", 0)
            for which, state in (("first", 1), ("last", last)):
                saved = per_state[state]
                if not tool.restores_holes and saved["apparent_bytes"] > SPARSE_LIMIT:
                    r[f"restore_{which}_skipped"] = (
                        f"{name} restores holes as written zeros: "
                        f"{saved['apparent_bytes'] / 2**30:.0f} GiB"
                    )
                    continue
                log(f"W2 {name} restore state {state}")
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                try:
                    m = tool.restore(state, dest)
                except (CommandError, OSError, RuntimeError) as e:
                    r["error"] = f"restore {state}: {e}"
                    break
                root = _area_root(dest)
                got = area_digest(root) if root else {}
                same = root is not None and same_content(saved["facts"], got)
                lost = holes_lost(saved["facts"], got) if same else {}
                holes = same and not lost
                if lost:
                    r[f"restore_{which}_holes_lost"] = lost
                if same:
                    # Disk the restored files take, against what the saved ones took.
                    r[f"restore_{which}_alloc_ratio"] = sum(
                        f.allocated for f in got.values()
                    ) / max(1, saved["allocated_bytes"])
                shutil.rmtree(dest, ignore_errors=True)
                r.setdefault(f"restore_{which}_runs_s", []).append(m.seconds)
                r[f"restore_{which}_s"] = min(r[f"restore_{which}_runs_s"])
                # Until the files are on disk: the command, then the sync after
                # it (VML fsyncs what it restores, cp leaves it in the page cache).
                on_disk = r.setdefault(f"restore_{which}_disk_runs_s", [])
                on_disk.append(m.seconds + m.sync_seconds)
                r[f"restore_{which}_disk_s"] = min(on_disk)
                r[f"restore_{which}_ok"] = same and r.get(f"restore_{which}_ok", True)
                r[f"restore_{which}_holes"] = holes and r.get(f"restore_{which}_holes", True)
                r["restore_peak_rss"] = max(r["restore_peak_rss"], m.peak_rss)


def summarise(r: dict[str, Any]) -> None:
    """Headline numbers of one tool from its saves (as W1, plus bytes read)."""
    r.pop("_tool", None)
    saves = r["saves"]
    if not saves:
        return
    later = saves[1:]
    r["first_save_s"] = saves[0]["seconds"]
    r["median_later_save_s"] = median([s["seconds"] for s in later])
    r["first_read"] = saves[0]["read_chars"]
    r["median_later_read"] = median([s["read_chars"] for s in later if s["read_chars"] is not None])
    r["peak_rss"] = max([s["peak_rss"] for s in saves] + [r.get("restore_peak_rss", 0)])
    r["repo_allocated"] = saves[-1]["repo_allocated"]
    growth = [b["repo_allocated"] - a["repo_allocated"] for a, b in itertools.pairwise(saves)]
    r["growth_median"] = median(growth)
    if "cache_allocated" in saves[-1]:
        r["cache_allocated"] = saves[-1]["cache_allocated"]


# --- VML alone: live saves, and the scale test --------------------------------


def live_saves(
    pristine: Path, base: Path, params: W2Params, vml_src: Path, log: Log
) -> dict[str, Any]:
    """VML saves the guest *while it works*, once per session (a copy of state 1, its own repository)."""
    area = base / "live" / NAME
    out: dict[str, Any] = {"saves": []}
    shutil.rmtree(area.parent, ignore_errors=True)
    copy_area(pristine, area)
    vm = GuestVM(area, vml_src, params.accel)
    vml = _tool("vml", base / "live")
    assert isinstance(vml, VmlW2Tool)
    try:
        if params.rest == "off":
            _redescribe(vm, area, params, append_line("wait"))
        vml.init()
        out["first"] = _save(vml, area, 0)
        vm.start()
        seen = 0
        if params.rest == "off":
            seen, _ = vm.wait_mark(r"^ready")
        for k in range(1, params.sessions + 1):
            vm.press()
            seen, _ = vm.wait_mark(r"^session=\d+ untarred", seen)
            log(f"W2 live save {k}")
            rec = _save(vml, area, k)
            entry = vml.handles[k]
            shown = json.loads(vml.run("show", entry, "--json").stdout)
            live = (shown.get("vm") or {}).get("live") or {}
            rec["pause_s"] = live.get("pause_seconds")
            rec["copied_bytes"] = live.get("copied_bytes")
            out["saves"].append(rec)
            seen, _ = vm.wait_mark(r"^session=\d+ done", seen)
    except (CommandError, OSError, RuntimeError, ValueError) as e:
        out["error"] = str(e)
    finally:
        vm.kill()
    saves = out["saves"]
    if saves:
        pauses = [s["pause_s"] for s in saves if s["pause_s"] is not None]
        out["median_pause_s"] = median(pauses)
        out["max_pause_s"] = max(pauses) if pauses else None
        out["median_save_s"] = median([s["seconds"] for s in saves])
        out["median_read"] = median([s["read_chars"] for s in saves if s["read_chars"] is not None])
        sizes = [out["first"]["repo_allocated"]] + [s["repo_allocated"] for s in saves]
        out["growth_median"] = median([b - a for a, b in itertools.pairwise(sizes)])
        out["peak_rss"] = max(s["peak_rss"] for s in [out["first"], *saves])
    shutil.rmtree(area.parent, ignore_errors=True)
    return out


def _redescribe(vm: GuestVM, area: Path, params: W2Params, append: str) -> None:
    disk = next(area.glob("disk.*"))
    vm.describe(disk, params.ram_mib, area / "vmlinuz", area / "initrd.gz", append)


def scale_test(
    tree: Path, fmt: str, base: Path, params: W2Params, guest: Any, vml_src: Path, log: Log
) -> dict[str, Any]:
    """VML: a later save after the guest overwrote ``scale_mib`` in place, on two disk sizes."""
    out: dict[str, Any] = {"change_mib": params.scale_mib}
    for label, size in (("big", params.disk_mib), ("small", params.scale_small_mib)):
        work = base / f"scale-{label}"
        area = work / NAME
        shutil.rmtree(work, ignore_errors=True)
        area.mkdir(parents=True)
        rec: dict[str, Any] = {"disk_mib": size}
        out[label] = rec
        try:
            log(f"W2 {fmt} scale: {size} MiB disk")
            make_disk(area / f"disk.{fmt}", tree, size * MIB, fmt)
            vm = GuestVM(area, vml_src, params.accel)
            vm.describe(
                area / f"disk.{fmt}", params.ram_mib, guest.kernel, guest.initrd,
                append_line("once", params.scale_mib),
            )  # fmt: skip
            vml = _tool("vml", work)
            vml.init()
            rec["first"] = _save(vml, area, 1)
            vm.start()
            _, marker = vm.wait_mark(r"^write done")
            vm.wait_off()
            rec["guest_written_kib"] = _written_kib(marker)
            rec["later"] = _save(vml, area, 2)
        except (CommandError, OSError, RuntimeError) as e:
            rec["error"] = str(e)
        shutil.rmtree(work, ignore_errors=True)
    big, small = out["big"].get("later"), out["small"].get("later")
    if big and small:
        out["ratio_s"] = big["seconds"] / small["seconds"]
        out["peak_rss"] = max(
            r[k]["peak_rss"] for r in (out["big"], out["small"]) for k in ("first", "later")
        )
    return out


# --- one format, and the whole workload ---------------------------------------


def run_format(
    fmt: str,
    names: list[str],
    tree: Path,
    guest: Any,
    params: W2Params,
    work: Path,
    restore: tuple[Path, int],
    vml_src: Path,
    log: Log,
) -> dict[str, Any]:
    """W2 on one disk format: states, saves, restores, live saves and the scale test."""
    base = work / f"w2-{fmt}"
    shutil.rmtree(base, ignore_errors=True)
    area = base / NAME
    area.mkdir(parents=True)
    log(f"W2 {fmt}: making the {params.disk_mib} MiB disk")
    make_disk(area / f"disk.{fmt}", tree, params.disk_mib * MIB, fmt)
    vm = GuestVM(area, vml_src, params.accel)
    mode = "wait" if params.rest == "save" else "once"
    vm.describe(area / f"disk.{fmt}", params.ram_mib, guest.kernel, guest.initrd, append_line(mode))
    sessions = Sessions(vm, fmt, params.rest, base / "refs")
    out: dict[str, Any] = {}
    pristine = base / "pristine"
    try:
        sessions.settle()
        if "vml" in names and params.live:
            copy_area(area, pristine)  # state 1, for the live saves
        results, per_state = save_states(
            names, base, sessions, params.sessions + 1, log, params.cold
        )
        vm.kill()
        restore_states(results, per_state, params.sessions + 1, restore[0], restore[1], log)
    finally:
        vm.kill()
    for r in results.values():
        summarise(r)
    out["tools"] = results
    if "vml" in names:
        probe = VmlW2Tool(base / "repo-vml", base)
        probe.measure_io = True
        out["vml_startup_read"] = probe.run("--help").read_chars
    out["states"] = {
        k: {key: v for key, v in info.items() if key != "facts"} for k, info in per_state.items()
    }
    if not params.keep:
        for path in [*base.glob("repo-*"), *base.glob("home-*"), base / "refs"]:
            shutil.rmtree(path, ignore_errors=True)
    if "vml" in names and params.live:
        out["live"] = live_saves(pristine, base, params, vml_src, log)
        shutil.rmtree(pristine, ignore_errors=True)
    if "vml" in names and params.scale_mib:
        out["scale"] = scale_test(tree, fmt, base, params, guest, vml_src, log)
    return out


def facts_json(facts: dict[str, FileFacts]) -> dict[str, Any]:
    """FileFacts as plain dicts for the JSON."""
    return {k: asdict(v) for k, v in facts.items()}


def run_w2(
    params: W2Params,
    names: list[str],
    raw_names: list[str],
    work: Path,
    restore: tuple[Path, int],
    vml_src: Path,
    log: Log,
) -> dict[str, Any]:
    """The whole workload: the guest's files made once, then every format in turn."""
    from tests.guest.build import build_guest

    guest = build_guest()
    data = GuestData.for_fill(params.fill_mib, params.scale_mib)
    out: dict[str, Any] = {
        "params": {**asdict(params), "formats": list(params.formats)},
        "guest": {"kernel": guest.kernel_version, "data": asdict(data)},
        "formats": {},
    }
    tree = work / "w2-tree"
    shutil.rmtree(tree, ignore_errors=True)
    log(f"W2: making the guest's files ({params.fill_mib} MiB)")
    make_tree(tree, data, params.seed)
    try:
        for fmt in params.formats:
            tools = raw_names if fmt == "raw" else names
            try:
                out["formats"][fmt] = run_format(
                    fmt, tools, tree, guest, params, work, restore, vml_src, log
                )
            except (CommandError, OSError, RuntimeError, subprocess.CalledProcessError) as e:
                log(f"W2 {fmt} failed: {e}")
                out["formats"][fmt] = {"error": str(e), "tools": {}, "states": {}}
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return out
