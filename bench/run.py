"""Benchmark VML against the tools a user would pick instead, on one workload, in one run.

    python bench/run.py                 # W1, standard size (~5-15 minutes, up to ~12 GiB scratch)
    python bench/run.py --smoke         # W1, tiny, under a minute
    python bench/run.py --tools borg,cp --states 4 --skip-big
    python bench/run.py --workload w2   # W2: the real guest, 64 GiB disks, qcow2 and raw
    python bench/run.py --workload w2 --smoke   # W2, tiny: a couple of minutes

W1 (the synthetic workload, unchanged so runs compare with earlier ones)
is described here; W2 (a real Linux guest at work, issue 12) in
``bench/w2.py``.

Steps: build the working area (see ``bench/workload.py``), then for each
state run a work session, record the sha256 of every file, and save the area
with every tool. Afterwards restore the first and the last state with every
tool and compare them byte for byte. For VML alone, also restore the tip of a
deep incremental chain against a full entry of the same state, and measure
the peak RSS of saving a workload four times bigger.

Runs are warm-cache: page caches are not dropped (that needs privileges the
benchmark cannot count on); ``sync`` runs before every measured command.
Output: a table on stdout, ``OUT/results.json`` and ``OUT/chart.png``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import CommandError, Measurement, disk_usage, median
from bench.report import attach_targets, draw_chart, format_table, write_json
from bench.tools import TOOLS, Tool, VmlTool
from bench.w2 import W2Params, run_w2
from bench.w2report import attach as attach_w2_targets
from bench.w2report import format_w2
from bench.workload import (
    WorkloadSpec,
    find_area_root,
    hash_area,
    make_area,
    run_session,
)

BENCH_DIR = Path(__file__).resolve().parent


def log(msg: str) -> None:
    """Progress on stderr, so stdout carries only the final report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--disk-mib", type=int, default=2048, help="virtual disk size")
    p.add_argument("--fill-mib", type=int, default=512, help="files in the guest filesystem")
    p.add_argument("--vmem-mib", type=int, default=256, help="memory image size")
    p.add_argument("--change-mib", type=int, default=16, help="disk bytes written per session")
    p.add_argument(
        "--states", type=int, default=6, help="states saved (the first is the fresh area)"
    )
    p.add_argument("--chain-depth", type=int, default=50, help="vml incremental chain depth")
    p.add_argument(
        "--chain-change-mib", type=int, default=4, help="disk bytes per session in the chain"
    )
    p.add_argument("--tools", default="vml,borg,bup,restic,cp", help="comma-separated tools")
    p.add_argument("--skip-big", action="store_true", help="skip the vml 4x-workload RSS run")
    p.add_argument("--seed", type=int, default=1, help="workload seed (fixed: runs compare)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="results directory")
    p.add_argument("--scratch", type=Path, default=None, help="work dir (default OUT/scratch)")
    p.add_argument(
        "--vml-src",
        type=Path,
        default=None,
        help="folder holding the vml package to benchmark (default: this checkout), "
        "e.g. from `git archive HEAD vml | tar -x -C DIR`",
    )
    p.add_argument(
        "--restore-runs", type=int, default=3, help="times each restore runs (fastest counts)"
    )
    p.add_argument(
        "--restore-dir",
        type=Path,
        default=None,
        help="restore into this folder (e.g. /dev/shm: no disk noise) instead of the scratch",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch dir afterwards")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run: W1 64 MiB disk, 16 MiB files, 8 MiB memory, 1 MiB changes, 3 states, "
        "chain depth 5, skip big; W2 128 MiB disks, 24 MiB files, 96 MiB RAM, 1 session, "
        "scale test 1 MiB on 128 vs 64 MiB (explicit flags override these)",
    )
    _w2_args(p)
    if p.parse_known_args(argv)[0].smoke:
        # Smoke sizes are defaults, so explicit flags still win (--smoke --states 5).
        p.set_defaults(
            disk_mib=64,
            fill_mib=16,
            vmem_mib=8,
            change_mib=1,
            states=3,
            chain_depth=5,
            chain_change_mib=1,
            skip_big=True,
            restore_runs=1,
            w2_disk_mib=128,
            w2_fill_mib=24,
            w2_ram_mib=96,
            w2_sessions=1,
            w2_scale_mib=1,
            w2_scale_small_mib=64,
        )
    args = p.parse_args(argv)
    for tools in (args.tools, args.w2_raw_tools or args.tools):
        unknown = set(tools.split(",")) - set(TOOLS)
        if unknown:
            p.error(f"unknown tools: {', '.join(sorted(unknown))} (known: {', '.join(TOOLS)})")
    if set(args.w2_formats.split(",")) - {"qcow2", "raw"}:
        p.error("--w2-formats takes qcow2, raw or both")
    if args.states < 1:
        p.error("--states must be at least 1")
    if args.restore_runs < 1:
        p.error("--restore-runs must be at least 1")
    return args


def _w2_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        choices=("w1", "w2", "both"),
        default="w1",
        help="w1: the synthetic VMware-style workload (as before); w2: the real guest",
    )
    g = p.add_argument_group("W2, the real guest (--workload w2)")
    g.add_argument("--w2-disk-mib", type=int, default=65536, help="virtual disk size")
    g.add_argument("--w2-fill-mib", type=int, default=512, help="real files in the guest's ext4")
    g.add_argument("--w2-ram-mib", type=int, default=256, help="guest RAM (the physics.ram file)")
    g.add_argument("--w2-sessions", type=int, default=5, help="work sessions (states = +1)")
    g.add_argument("--w2-formats", default="qcow2,raw", help="disk formats, each run in turn")
    g.add_argument(
        "--w2-rest",
        choices=("save", "off"),
        default="save",
        help="between sessions: saved with vml stop --save (RAM kept), or powered off",
    )
    g.add_argument("--w2-raw-tools", default=None, help="tools on the raw disk (default: --tools)")
    g.add_argument("--w2-scale-mib", type=int, default=16, help="scale test change (0: skip)")
    g.add_argument("--w2-scale-small-mib", type=int, default=2048, help="scale test small disk")
    g.add_argument("--w2-no-live", action="store_true", help="skip VML's live saves")
    g.add_argument("--w2-accel", default=None, help="kvm or tcg (default: vml run's choice)")
    g.add_argument(
        "--w2-cold",
        action="store_true",
        help="drop the area's files from the page cache before each save (read_bytes then "
        "counts what each tool read from the disk, mmap included)",
    )


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including each peer's version."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for name, cmd in {
        "borg": ["borg", "--version"],
        "bup": ["bup", "--version"],
        "restic": ["restic", "version"],
        "qemu-img": ["qemu-img", "--version"],
    }.items():
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
            versions[name] = out.splitlines()[0].strip() if out else "?"
        except OSError:
            versions[name] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _restore_and_check(
    tool: Tool, state: int, dest: Path, expected: dict[str, str]
) -> tuple[Measurement, bool]:
    """Restore ``state`` into a fresh ``dest``; return the measurement and identical."""
    _fresh(dest)
    m = tool.restore(state, dest)
    root = find_area_root(dest)
    ok = root is not None and hash_area(root) == expected
    shutil.rmtree(dest, ignore_errors=True)
    return m, ok


def bench_tools(
    names: list[str],
    spec: WorkloadSpec,
    states: int,
    scratch: Path,
    area: Path,
    restore_runs: int = 3,
    restore_dir: Path | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, str]]]:
    """Save every state with every tool, then restore the first and last state.

    Each restore is timed ``restore_runs`` times; the fastest counts.  Restores
    go to ``restore_dir`` (default: ``scratch/restore``).
    """
    tools: dict[str, Tool] = {
        n: TOOLS[n](scratch / f"repo-{n}", _fresh(scratch / f"home-{n}")) for n in names
    }
    results: dict[str, dict[str, Any]] = {n: {"saves": [], "error": None} for n in names}
    for name, tool in tools.items():
        try:
            tool.init()
        except (CommandError, OSError, RuntimeError) as e:
            results[name]["error"] = f"init: {e}"
    hashes: dict[int, dict[str, str]] = {}
    for state in range(1, states + 1):
        if state > 1:
            log(f"session {state - 1}")
            run_session(area, state - 1, spec)
        # Hash right after the session: this is what every restore must match.
        hashes[state] = hash_area(area)
        for name, tool in tools.items():
            r = results[name]
            if r["error"]:
                continue
            log(f"state {state}: {name} save")
            try:
                m = tool.save(area, state)
            except (CommandError, OSError, RuntimeError) as e:
                r["error"] = f"save {state}: {e}"
                continue
            du = tool.size()
            r["saves"].append(
                {
                    "state": state,
                    "seconds": m.seconds,
                    "sync_seconds": m.sync_seconds,
                    "peak_rss": m.peak_rss,
                    "repo_allocated": du.allocated,
                    "repo_apparent": du.apparent,
                }
            )
    # Restores run ``restore_runs`` rounds, every tool in turn within a round,
    # and the fastest round counts for each: a restore writes a GiB, and on a
    # virtual disk one write can take several times another's time (after
    # other gigabytes were written or deleted), whichever tool meets it.
    for name in names:
        results[name]["restore_peak_rss"] = 0
    dest = restore_dir if restore_dir is not None else scratch / "restore"
    order = list(tools)
    for rnd in range(restore_runs):
        # Each round starts with another tool: whoever follows a big
        # deletion on a virtual disk may pay for it (see BENCHMARKS.md).
        for name in order[rnd % len(order) :] + order[: rnd % len(order)]:
            tool = tools[name]
            r = results[name]
            if r["error"]:
                continue
            try:
                for which, state in (("first", 1), ("last", states)):
                    log(f"{name} restore state {state}")
                    m, ok = _restore_and_check(tool, state, dest, hashes[state])
                    r.setdefault(f"restore_{which}_runs_s", []).append(m.seconds)
                    r[f"restore_{which}_s"] = min(r[f"restore_{which}_runs_s"])
                    r[f"restore_{which}_sync_s"] = m.sync_seconds
                    # Every run must be identical, not only the fastest.
                    r[f"restore_{which}_ok"] = ok and r.get(f"restore_{which}_ok", True)
                    r["restore_peak_rss"] = max(r["restore_peak_rss"], m.peak_rss)
            except (CommandError, OSError, RuntimeError) as e:
                r["error"] = f"restore: {e}"
    for r in results.values():
        _summarise(r)
    return results, hashes


def _summarise(r: dict[str, Any]) -> None:
    """Derive the headline numbers of one tool from its per-save records."""
    saves = r["saves"]
    if not saves:
        return
    r["first_save_s"] = saves[0]["seconds"]
    r["median_later_save_s"] = median([s["seconds"] for s in saves[1:]])
    r["save_peak_rss"] = max(s["peak_rss"] for s in saves)
    r["peak_rss"] = max(r["save_peak_rss"], r.get("restore_peak_rss", 0))
    r["repo_allocated"] = saves[-1]["repo_allocated"]
    r["repo_apparent"] = saves[-1]["repo_apparent"]
    growth = [b["repo_allocated"] - a["repo_allocated"] for a, b in itertools.pairwise(saves)]
    r["growth_median"] = median(growth)


def bench_chain(
    pristine: Path,
    spec: WorkloadSpec,
    depth: int,
    scratch: Path,
    runs: int = 3,
    restore_dir: Path | None = None,
) -> dict[str, Any]:
    """VML: restore the tip of a ``depth``-deep incremental chain vs a full entry.

    Each restore runs ``runs`` times, alternating, and the fastest counts, so
    one slow write does not decide a 1.2x target.
    """
    out: dict[str, Any] = {"depth": depth, "change_mib": spec.change_mib}
    dest = restore_dir if restore_dir is not None else scratch / "restore"
    area = scratch / "chain-area"
    shutil.rmtree(area, ignore_errors=True)
    subprocess.run(["cp", "-r", "--sparse=always", str(pristine), str(area)], check=True)
    vml = VmlTool(scratch / "repo-vml-chain", _fresh(scratch / "home-vml-chain"))
    try:
        vml.init()
        vml.save(area, 0)
        for step in range(1, depth + 1):
            log(f"chain: session {step}/{depth}")
            run_session(area, step, spec)
            vml.save(area, step)
        expected = hash_area(area)
        vml.save(area, depth + 1, full=True)
        tip: list[float] = []
        full: list[float] = []
        for _ in range(runs):
            m, out["tip_ok"] = _restore_and_check(vml, depth, dest, expected)
            tip.append(m.seconds)
            m, out["full_ok"] = _restore_and_check(vml, depth + 1, dest, expected)
            full.append(m.seconds)
        out["restore_tip_s"] = min(tip)
        out["restore_full_s"] = min(full)
        out["restore_tip_runs_s"] = tip
        out["restore_full_runs_s"] = full
        try:
            kinds = {str(e.get("id")): e.get("kind") for e in vml.log()}
            out["tip_kind"] = kinds.get(vml.handles[depth])
            out["full_kind"] = kinds.get(vml.handles[depth + 1])
        except (CommandError, ValueError) as e:
            out["log_error"] = str(e)
    except (CommandError, OSError, RuntimeError) as e:
        out["error"] = str(e)
    shutil.rmtree(area, ignore_errors=True)
    shutil.rmtree(vml.repo, ignore_errors=True)
    return out


def bench_big(spec: WorkloadSpec, scratch: Path) -> dict[str, Any]:
    """VML: peak RSS of a first and a later save on a 4x bigger workload."""
    big = WorkloadSpec(
        disk_mib=spec.disk_mib * 4,
        fill_mib=spec.fill_mib * 4,
        vmem_mib=spec.vmem_mib * 4,
        change_mib=spec.change_mib,
        seed=spec.seed,
    )
    out: dict[str, Any] = {"params": big.__dict__}
    area = scratch / "big-area"
    shutil.rmtree(area, ignore_errors=True)
    log(f"big: making a {big.disk_mib} MiB area")
    make_area(area, big)
    vml = VmlTool(scratch / "repo-vml-big", _fresh(scratch / "home-vml-big"))
    try:
        vml.init()
        log("big: vml first save")
        first = vml.save(area, 1)
        run_session(area, 1, big)
        log("big: vml later save")
        later = vml.save(area, 2)
        out.update(
            first_save_s=first.seconds,
            later_save_s=later.seconds,
            first_save_peak_rss=first.peak_rss,
            later_save_peak_rss=later.peak_rss,
            peak_rss=max(first.peak_rss, later.peak_rss),
            repo_allocated=disk_usage(vml.repo).allocated,
        )
    except (CommandError, OSError, RuntimeError) as e:
        out["error"] = str(e)
    shutil.rmtree(area, ignore_errors=True)
    shutil.rmtree(vml.repo, ignore_errors=True)
    return out


def vml_usable() -> str | None:
    """None if ``python -m vml --help`` works from the source tree, else why not."""
    try:
        VmlTool(Path(), Path()).run("--help")
    except CommandError as e:
        return str(e).strip().splitlines()[-1][:300]
    return None


def vml_source() -> dict[str, Any]:
    """Which VML was measured: its folder and, in a git checkout, the commit and dirtiness."""
    src = VmlTool.src
    info: dict[str, Any] = {"path": str(src)}
    git = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    if git.returncode == 0:
        info["commit"] = git.stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "vml"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["vml_dirty"] = bool(status.stdout.strip())
    return info


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark(s) ``--workload`` names; print the reports; write the JSON."""
    args = parse_args(argv)
    if args.vml_src:
        VmlTool.src = args.vml_src.resolve()
    if args.workload in ("w1", "both"):
        main_w1(args)
    if args.workload in ("w2", "both"):
        main_w2(args)
    return 0


def main_w2(args: argparse.Namespace) -> None:
    """W2: the real guest; print its report, write ``OUT/results-w2.json``."""
    out: Path = args.out.resolve()
    scratch: Path = (args.scratch or out / "scratch").resolve()
    work = _fresh(scratch / "vml-bench-w2")
    params = W2Params(
        disk_mib=args.w2_disk_mib,
        fill_mib=args.w2_fill_mib,
        ram_mib=args.w2_ram_mib,
        sessions=args.w2_sessions,
        formats=tuple(args.w2_formats.split(",")),
        rest=args.w2_rest,
        scale_mib=args.w2_scale_mib,
        scale_small_mib=args.w2_scale_small_mib,
        live=not args.w2_no_live,
        accel=args.w2_accel,
        seed=args.seed,
        cold=args.w2_cold,
        keep=args.keep,
    )
    names = args.tools.split(",")
    raw_names = (args.w2_raw_tools or args.tools).split(",")
    if "vml" in names + raw_names and (why := vml_usable()):
        raise SystemExit(f"vml is not usable, W2 needs it to run the guest: {why}")
    restore = (args.restore_dir or work) / "vml-bench-restore"
    results: dict[str, Any] = {
        "machine": machine_info(),
        "vml_source": vml_source(),
        "cache": "warm (page caches not dropped; sync before each measured command)",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_avg_start": os.getloadavg()[0],
    }
    started = time.perf_counter()
    try:
        results.update(
            run_w2(params, names, raw_names, work, (restore, args.restore_runs), VmlTool.src, log)
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(restore, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - started
    results["load_avg_end"] = os.getloadavg()[0]
    attach_w2_targets(results)
    write_json(results, out / "results-w2.json")
    print(format_w2(results))
    print(f"\nwrote {out / 'results-w2.json'}")


def main_w1(args: argparse.Namespace) -> None:
    """W1: the synthetic workload; print the report; write results.json and chart.png."""
    names = args.tools.split(",")
    out: Path = args.out.resolve()
    scratch: Path = (args.scratch or out / "scratch").resolve()
    # Our own subdirectory: never wipe a directory the user pointed us at.
    work = _fresh(scratch / "vml-bench")
    spec = WorkloadSpec(args.disk_mib, args.fill_mib, args.vmem_mib, args.change_mib, args.seed)
    results: dict[str, Any] = {
        "params": {
            **spec.__dict__,
            "states": args.states,
            "chain_depth": args.chain_depth,
            "restore_runs": args.restore_runs,
            "restore_dir": None if args.restore_dir is None else str(args.restore_dir),
        },
        "machine": machine_info(),
        "vml_source": vml_source(),
        "cache": "warm (page caches not dropped; sync before each measured command)",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # Other work on the machine inflates every time; the report warns.
        "load_avg_start": os.getloadavg()[0],
    }
    if "vml" in names and (why := vml_usable()):
        log(f"vml is not usable, skipping it: {why}")
        names.remove("vml")
        results["vml_unusable"] = why
    started = time.perf_counter()
    restore_dir = None if args.restore_dir is None else args.restore_dir / "vml-bench-restore"
    try:
        area = work / "area"
        log(f"making the area ({spec.disk_mib} MiB disk, {spec.fill_mib} MiB files)")
        make_area(area, spec)
        pristine = work / "pristine"
        if "vml" in names and args.chain_depth > 0:
            # The chain starts from the same fresh area, without a second build.
            subprocess.run(["cp", "-r", "--sparse=always", str(area), str(pristine)], check=True)
        results["tools"], _ = bench_tools(
            names, spec, args.states, work, area, args.restore_runs, restore_dir
        )
        if not args.keep:
            # Free the peers' repositories (GiBs) before the chain and 4x runs.
            for path in [*work.glob("repo-*"), *work.glob("home-*")]:
                shutil.rmtree(path, ignore_errors=True)
        if "vml_unusable" in results:
            results["tools"]["vml"] = {"saves": [], "error": results["vml_unusable"]}
        if "vml" in names and args.chain_depth > 0:
            chain_spec = WorkloadSpec(
                spec.disk_mib, spec.fill_mib, spec.vmem_mib, args.chain_change_mib, spec.seed
            )
            results["vml_chain"] = bench_chain(
                pristine, chain_spec, args.chain_depth, work, args.restore_runs, restore_dir
            )
        if "vml" in names and not args.skip_big:
            results["vml_big"] = bench_big(spec, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        if restore_dir is not None:
            shutil.rmtree(restore_dir, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - started
    results["load_avg_end"] = os.getloadavg()[0]
    attach_targets(results)
    write_json(results, out / "results.json")
    charted = draw_chart(results, out / "chart.png")
    print(format_table(results))
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'chart.png'}" if charted else ""))
    if not charted:
        print("matplotlib missing: no chart (bench/setup.sh installs it)")


if __name__ == "__main__":
    sys.exit(main())
