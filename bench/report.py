"""Turn the raw results into the targets, a plain-text table, JSON and a PNG chart.

Results are plain dicts (the same shape as ``results.json``) so that the
report can be rebuilt from a saved JSON file without re-running anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20

ToolResult = dict[str, Any]
Results = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One PASS/FAIL line: ``value`` (a ratio or a size) must be ``<= limit``."""

    name: str
    value: float | None
    limit: float
    unit: str  # "x" for ratios, "MiB" for sizes
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """True/False, or None when the value could not be measured."""
        return None if self.value is None else self.value <= self.limit


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _get(results: Results, tool: str, key: str) -> float | None:
    entry = results["tools"].get(tool)
    if not entry or entry.get("error"):
        return None
    value = entry.get(key)
    return None if value is None else float(value)


def evaluate_targets(results: Results) -> list[Target]:
    """The project's targets (issue 3), all as ratios measured in the same run."""
    chain = results.get("vml_chain") or {}
    big = results.get("vml_big") or {}
    vml_rss = _get(results, "vml", "peak_rss")
    big_rss = big.get("peak_rss")
    return [
        Target(
            "vml first save <= 0.6x borg",
            _ratio(_get(results, "vml", "first_save_s"), _get(results, "borg", "first_save_s")),
            0.6,
            "x",
        ),
        Target(
            "vml later saves (median) <= 0.3x borg",
            _ratio(
                _get(results, "vml", "median_later_save_s"),
                _get(results, "borg", "median_later_save_s"),
            ),
            0.3,
            "x",
        ),
        Target(
            "vml growth per save <= 1.0x bup",
            _ratio(_get(results, "vml", "growth_median"), _get(results, "bup", "growth_median")),
            1.0,
            "x",
        ),
        Target(
            "vml restore of last state <= 0.5x borg",
            _ratio(_get(results, "vml", "restore_last_s"), _get(results, "borg", "restore_last_s")),
            0.5,
            "x",
        ),
        Target(
            f"vml restore at chain depth {results['params'].get('chain_depth')} <= 1.2x full entry",
            _ratio(chain.get("restore_tip_s"), chain.get("restore_full_s")),
            1.2,
            "x",
            ("error, see above" if chain.get("error") else "") if chain else "not run",
        ),
        Target(
            "vml peak RSS <= 100 MiB",
            None if vml_rss is None else vml_rss / MIB,
            100.0,
            "MiB",
        ),
        Target(
            "vml peak RSS on 4x workload <= 100 MiB",
            None if big_rss is None else big_rss / MIB,
            100.0,
            "MiB",
            "" if big else "skipped (--skip-big)",
        ),
    ]


def _brief(error: str, lines: int = 2) -> str:
    """The last lines of an error (a traceback's tail says what broke); JSON keeps it all."""
    kept = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    head = kept[0][:160] if kept else ""
    tail = kept[1:][-lines:]
    return " | ".join([head, *tail])


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _ok(entry: ToolResult) -> str:
    flags = [entry.get("restore_first_ok"), entry.get("restore_last_ok")]
    if any(f is None for f in flags):
        return "-"
    return "yes" if all(flags) else "NO"


def format_table(results: Results) -> str:
    """The per-tool table, the vml-only experiments and the target lines."""
    header = (
        "tool",
        "first save s",
        "later save s",
        "peak RSS MiB",
        "repo MiB",
        "growth MiB",
        "restore 1st s",
        "restore last s",
        "identical",
    )
    rows: list[tuple[str, ...]] = [header]
    errors: list[str] = []
    for name, e in results["tools"].items():
        if e.get("error"):
            errors.append(f"  {name}: {_brief(e['error'])}")
        rows.append(
            (
                name,
                _fmt(e.get("first_save_s")),
                _fmt(e.get("median_later_save_s")),
                _fmt(e.get("peak_rss"), MIB, 1),
                _fmt(e.get("repo_allocated"), MIB, 1),
                _fmt(e.get("growth_median"), MIB, 1),
                _fmt(e.get("restore_first_s")),
                _fmt(e.get("restore_last_s")),
                _ok(e),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    p = results["params"]
    out = [
        f"workload: {p['disk_mib']} MiB disk, {p['fill_mib']} MiB files, {p['vmem_mib']} MiB "
        f"memory, {p['change_mib']} MiB changes/session, {p['states']} states (warm cache)",
        "",
        *lines,
    ]
    load = max(results.get("load_avg_start", 0.0), results.get("load_avg_end", 0.0))
    cores = results.get("machine", {}).get("nproc") or 1
    if load > cores / 2:
        out += [
            "",
            f"warning: load average {load:.1f} on {cores} cores during the run: "
            "other work competed for the CPU, times are inflated and ratios noisy",
        ]
    if errors:
        out += ["", "errors:", *errors]
    chain = results.get("vml_chain")
    if chain:
        out += [
            "",
            f"vml chain: restore tip of {chain['depth']}-deep incremental chain "
            f"{_fmt(chain.get('restore_tip_s'))} s (identical: {chain.get('tip_ok')}), "
            f"full entry {_fmt(chain.get('restore_full_s'))} s (identical: {chain.get('full_ok')})",
        ]
        if chain.get("error"):
            out.append(f"  error: {_brief(chain['error'])}")
    big = results.get("vml_big")
    if big:
        bp = big["params"]
        out.append(
            f"vml 4x workload ({bp['disk_mib']} MiB disk, {bp['fill_mib']} MiB files, "
            f"{bp['vmem_mib']} MiB memory): peak RSS {_fmt(big.get('peak_rss'), MIB, 1)} MiB, "
            f"first save {_fmt(big.get('first_save_s'))} s, "
            f"later save {_fmt(big.get('later_save_s'))} s"
        )
        if big.get("error"):
            out.append(f"  error: {_brief(big['error'])}")
    out += ["", "targets:"]
    for t in results.get("targets", []):
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["passed"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        note = f"  ({t['note']})" if t.get("note") else ""
        out.append(f"  {verdict}  {t['name']}: {value} (limit {t['limit']}{t['unit']}){note}")
    return "\n".join(out)


def attach_targets(results: Results) -> None:
    """Evaluate the targets and store them in ``results["targets"]``."""
    results["targets"] = [{**asdict(t), "passed": t.passed} for t in evaluate_targets(results)]


def write_json(results: Results, path: Path) -> None:
    """Write the results as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def draw_chart(results: Results, path: Path) -> bool:
    """Draw save time, growth per save and restore time per tool; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on CI or a server
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    tools = [n for n, e in results["tools"].items() if not e.get("error")]
    entries = [results["tools"][n] for n in tools]

    def series(key: str, scale: float = 1.0) -> list[float]:
        # A missing value draws as an empty bar rather than breaking the chart.
        return [(e.get(key) or 0.0) / scale for e in entries]

    xs = list(range(len(tools)))
    w = 0.38
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    ax = axes[0]
    ax.bar([x - w / 2 for x in xs], series("first_save_s"), w, label="first save")
    ax.bar([x + w / 2 for x in xs], series("median_later_save_s"), w, label="later save (median)")
    ax.set_title("Save time")
    ax.set_ylabel("seconds")
    ax.legend()
    ax = axes[1]
    growth = series("growth_median", MIB)
    bars = ax.bar(xs, growth, 0.6, color="tab:green")
    # Log scale: the copy baseline is ~50x the others and would flatten them.
    ax.set_yscale("log")
    ax.set_ylim(bottom=min([1.0, *(g / 2 for g in growth if g > 0)]))
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_title("Repository growth per save (median, log)")
    ax.set_ylabel("MiB (allocated)")
    ax = axes[2]
    ax.bar([x - w / 2 for x in xs], series("restore_first_s"), w, label="first state")
    ax.bar([x + w / 2 for x in xs], series("restore_last_s"), w, label="last state")
    ax.set_title("Restore time")
    ax.set_ylabel("seconds")
    ax.legend()
    for ax in axes:
        ax.set_xticks(xs)
        ax.set_xticklabels(tools)
        ax.grid(axis="y", alpha=0.3)
    p = results["params"]
    fig.suptitle(
        f"VML vs peers: {p['disk_mib']} MiB disk, {p['fill_mib']} MiB files, "
        f"{p['vmem_mib']} MiB memory, {p['change_mib']} MiB/session, {p['states']} states "
        "(warm cache)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
