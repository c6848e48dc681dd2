"""W2's targets (issue 12) and its report: one table per disk format, then the target lines.

Works on the plain dicts of ``results-w2.json``, so a report can be rebuilt
from a saved run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.measure import median

MIB = 1 << 20


@dataclass(frozen=True)
class W2Target:
    """One PASS/FAIL line; ``ok`` adds a condition a ratio cannot say (identity, holes)."""

    name: str
    value: float | None
    limit: float
    unit: str
    note: str = ""
    ok: bool = True

    @property
    def passed(self) -> bool | None:
        """True/False, or None when the value could not be measured."""
        return None if self.value is None else self.value <= self.limit and self.ok


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _tool(fr: dict[str, Any], name: str, key: str) -> Any:
    entry = fr["tools"].get(name)
    if not entry or entry.get("error"):
        return None
    return entry.get(key)


def read_ratios(fr: dict[str, Any]) -> tuple[float | None, float | None]:
    """Median over VML's later saves of bytes read / guest changed and / allocated data."""
    vml = fr["tools"].get("vml") or {}
    states = fr["states"]
    by_changed, by_data = [], []
    for s in vml.get("saves", [])[1:]:
        info = states.get(s["state"]) or states.get(str(s["state"])) or {}
        changed = (info.get("changed") or {}).get("guest_changed")
        if s.get("read_chars") is None:
            continue
        if changed:
            by_changed.append(s["read_chars"] / changed)
        if info.get("data_bytes"):
            by_data.append(s["read_chars"] / info["data_bytes"])
    return median(by_changed), median(by_data)


def _last_state(fr: dict[str, Any]) -> dict[str, Any]:
    states = fr["states"]
    return states[max(states, key=int)] if states else {}


def peak_rss(fr: dict[str, Any]) -> float | None:
    """VML's largest RSS in this format: saves, restores, live saves, scale test."""
    values = [_tool(fr, "vml", "peak_rss")]
    values.append((fr.get("live") or {}).get("peak_rss"))
    values.append((fr.get("scale") or {}).get("peak_rss"))
    known = [v for v in values if v]
    return max(known) / MIB if known else None


def evaluate(fmt: str, fr: dict[str, Any]) -> list[W2Target]:
    """The targets of issue 12 for one format, ratios within this run."""
    vml_later = _tool(fr, "vml", "median_later_save_s")
    by_changed, by_data = read_ratios(fr)
    last = _last_state(fr)
    cache = _tool(fr, "vml", "cache_allocated")
    data = last.get("data_bytes")
    scale = fr.get("scale") or {}
    ok_last = _tool(fr, "vml", "restore_last_ok")
    holes_last = _tool(fr, "vml", "restore_last_holes")
    if ok_last is None:
        restore_note = "not restored"
    elif not ok_last:
        restore_note = "NOT identical"
    else:
        restore_note = "identical, holes kept" if holes_last else "holes NOT kept"
    # The command alone, for the record: cp's ends with its data still in the page cache.
    alone = _ratio(_tool(fr, "vml", "restore_last_s"), _tool(fr, "cp", "restore_last_s"))
    if alone is not None:
        restore_note += f"; command alone {alone:.2f}x"
    p = f"W2 {fmt}:"
    return [
        W2Target(
            f"{p} vml later save <= 0.2x borg",
            _ratio(vml_later, _tool(fr, "borg", "median_later_save_s")),
            0.2,
            "x",
        ),
        W2Target(
            f"{p} vml bytes read per later save <= 3x guest changed",
            by_changed,
            3.0,
            "x",
            "with a dirty bitmap",
        ),
        W2Target(
            f"{p} vml bytes read per later save <= allocated data",
            by_data,
            1.0,
            "x",
            "without a bitmap",
        ),
        W2Target(
            f"{p} vml growth per save <= 1.0x bup",
            _ratio(_tool(fr, "vml", "growth_median"), _tool(fr, "bup", "growth_median")),
            1.0,
            "x",
        ),
        W2Target(
            f"{p} vml first save <= 0.6x borg",
            _ratio(_tool(fr, "vml", "first_save_s"), _tool(fr, "borg", "first_save_s")),
            0.6,
            "x",
        ),
        W2Target(
            f"{p} vml last-state restore <= 1.0x cp --sparse=always (on disk), identical, holes kept",
            _ratio(_tool(fr, "vml", "restore_last_disk_s"), _tool(fr, "cp", "restore_last_disk_s")),
            1.0,
            "x",
            restore_note,
            bool(ok_last and holes_last),
        ),
        W2Target(
            f"{p} vml later save, {scale.get('change_mib', '?')} MiB changed: "
            f"{(scale.get('big') or {}).get('disk_mib', '?')} MiB disk <= 1.5x "
            f"{(scale.get('small') or {}).get('disk_mib', '?')} MiB disk",
            scale.get("ratio_s"),
            1.5,
            "x",
            "" if scale else "not run",
        ),
        W2Target(
            f"{p} .vml/cache <= 1% of allocated data",
            None if cache is None or not data else 100.0 * cache / data,
            1.0,
            "%",
        ),
        W2Target(f"{p} vml peak RSS <= 100 MiB", peak_rss(fr), 100.0, "MiB"),
    ]


def attach(results: dict[str, Any]) -> None:
    """Evaluate every format's targets into ``results["targets"]``."""
    results["targets"] = [
        {**asdict(t), "passed": t.passed}
        for fmt, fr in results["formats"].items()
        for t in evaluate(fmt, fr)
    ]


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _flag(entry: dict[str, Any], key: str) -> str:
    flags = [entry.get(f"restore_first_{key}"), entry.get(f"restore_last_{key}")]
    if any(f is None for f in flags):
        return "-"
    return "yes" if all(flags) else "NO"


def _table(fr: dict[str, Any]) -> list[str]:
    header = (
        "tool", "first save s", "later save s", "read MiB/save", "peak RSS MiB", "repo MiB",
        "growth MiB", "restore 1st s", "restore last s", "identical", "holes kept",
    )  # fmt: skip
    rows = [header]
    for name, e in fr["tools"].items():
        rows.append(
            (
                name,
                _fmt(e.get("first_save_s")),
                _fmt(e.get("median_later_save_s")),
                _fmt(e.get("median_later_read"), MIB, 1),
                _fmt(e.get("peak_rss"), MIB, 1),
                _fmt(e.get("repo_allocated"), MIB, 1),
                _fmt(e.get("growth_median"), MIB, 1),
                _fmt(e.get("restore_first_s")),
                _fmt(e.get("restore_last_s")),
                _flag(e, "ok"),
                _flag(e, "holes"),
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
    return lines


def _details(fr: dict[str, Any]) -> list[str]:
    out: list[str] = []
    changed = [s.get("changed") or {} for s in fr["states"].values()]
    changed = [c for c in changed if c]
    written = [s.get("guest_written_kib") for s in fr["states"].values()]
    if changed:

        def med(key: str) -> str:
            return _fmt(median([c[key] for c in changed]), MIB, 1)

        kib = [w for w in written if w is not None]
        out.append(
            f"guest changed per session (median): {med('guest_changed')} MiB = disk "
            f"{med('disk_guest')} (64 KiB guest clusters) + RAM {med('ram_pages')} (4 KiB pages) "
            f"+ other files {med('other_files')}; disk file blocks changed {med('disk_file')}; "
            f"guest wrote {_fmt(median(kib), 1024, 1)} MiB"
        )
    last = _last_state(fr)
    if last:
        out.append(
            f"area at the last state: {_fmt(last.get('data_bytes'), MIB, 1)} MiB of data, "
            f"{_fmt(last.get('allocated_bytes'), MIB, 1)} MiB allocated, "
            f"{_fmt(last.get('apparent_bytes'), 2**30, 1)} GiB apparent"
        )
    disk_reads = []
    for name, e in fr["tools"].items():
        rb = [s["read_bytes"] for s in e.get("saves", [])[1:] if s.get("read_bytes") is not None]
        if rb:
            disk_reads.append(f"{name} {_fmt(median(rb), MIB, 1)}")
    if disk_reads:
        out.append("read from storage per later save (read_bytes, MiB): " + ", ".join(disk_reads))
    vml = fr["tools"].get("vml") or {}
    if vml.get("cache_allocated") is not None:
        out.append(f"vml .vml/cache: {_fmt(vml['cache_allocated'], MIB, 2)} MiB")
    if fr.get("vml_startup_read") is not None:
        out.append(
            f"vml start-up alone (python -m vml --help) reads {_fmt(fr['vml_startup_read'], MIB, 1)}"
            " MiB (Python modules): part of every vml figure above"
        )
    for name, e in fr["tools"].items():
        for key in ("restore_first_skipped", "restore_last_skipped"):
            if e.get(key):
                out.append(f"{name}: restore skipped ({e[key]})")
        lost = e.get("restore_last_holes_lost") or e.get("restore_first_holes_lost")
        if lost:
            extra = ", ".join(f"{k} +{v / MIB:.1f} MiB" for k, v in sorted(lost.items()))
            out.append(f"{name}: restored files take more disk than saved (holes filled): {extra}")
        if e.get("error"):
            out.append(f"{name}: error: {str(e['error']).strip().splitlines()[-1][:200]}")
    live = fr.get("live")
    if live:
        out.append(
            f"vml live saves (guest working): {len(live.get('saves', []))} saves, median "
            f"{_fmt(live.get('median_save_s'))} s, pause median {_fmt(live.get('median_pause_s'), 1, 3)}"
            f" s max {_fmt(live.get('max_pause_s'), 1, 3)} s, read {_fmt(live.get('median_read'), MIB, 1)}"
            f" MiB/save, growth {_fmt(live.get('growth_median'), MIB, 1)} MiB/save"
        )
        if live.get("error"):
            out.append(f"  live error: {live['error'][-200:]}")
    scale = fr.get("scale")
    if scale:
        parts = []
        for label in ("big", "small"):
            rec = scale.get(label) or {}
            later = rec.get("later") or {}
            parts.append(
                f"{rec.get('disk_mib')} MiB disk {_fmt(later.get('seconds'))} s "
                f"(read {_fmt(later.get('read_chars'), MIB, 1)} MiB)"
                + (f" error: {rec['error'][-160:]}" if rec.get("error") else "")
            )
        out.append(
            f"vml scale, later save after {scale['change_mib']} MiB written: " + "; ".join(parts)
        )
    return out


def format_w2(results: dict[str, Any]) -> str:
    """The W2 report: per format a table and details, then all target lines."""
    p = results["params"]
    out: list[str] = []
    for fmt, fr in results["formats"].items():
        if fr.get("error"):
            out += [f"W2 {fmt}: FAILED: {fr['error'][-400:]}", ""]
            continue
        out += [
            f"W2 {fmt}: real guest, {p['disk_mib'] / 1024:g} GiB virtual disk, {p['fill_mib']} MiB "
            f"files, {p['ram_mib']} MiB RAM, {p['sessions']} sessions, at rest: {p['rest']} "
            f"({'area evicted before each save' if p.get('cold') else 'warm cache'}; "
            "read = rchar of the tool's process tree)",
            "",
            *_table(fr),
            "",
            *_details(fr),
            "",
        ]
    load = max(results.get("load_avg_start", 0.0), results.get("load_avg_end", 0.0))
    cores = results.get("machine", {}).get("nproc") or 1
    if load > cores / 2:
        out += [
            f"warning: load average {load:.1f} on {cores} cores during the run: "
            "other work competed for the CPU, times are inflated and ratios noisy",
            "",
        ]
    out.append("W2 targets:")
    for t in results.get("targets", []):
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["passed"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        note = f"  ({t['note']})" if t.get("note") else ""
        out.append(f"  {verdict}  {t['name']}: {value} (limit {t['limit']}{t['unit']}){note}")
    return "\n".join(out)
