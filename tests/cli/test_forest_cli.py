"""The forest commands on a real repository through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import edit, make_area
from vml.cli.root import app

runner = CliRunner()


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    area = tmp_path / "area"
    make_area(area)
    monkeypatch.setenv("VML_REPO", str(repo))
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["init", str(repo), "--block-size", "64K"]).exit_code == 0
    for i in range(4):
        edit(area / "disk.img", i * 70_000, b"%d" % i * 3000)
        r = runner.invoke(app, ["commit", str(area), "-m", f"s{i}", "-q"])
        assert r.exit_code == 0, r.output
    return repo, area


def run(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def test_rm_convert_prune_gc_verify_fsck(setup: tuple[Path, Path]) -> None:
    code, out = run("rm", "E4")
    assert code == 2 and "holds it" in out and "--force" in out
    code, out = run("rm", "E2")
    assert code == 0, out
    assert "removed E2" in out and "rewrote E3" in out and "re-parented onto E1" in out
    code, out = run("show", "E3")
    assert code == 0 and "reshaped  E2 removed, re-parented onto E1" in out, out
    code, out = run("log", "--graph", "--all")
    assert code == 0 and "(E2 removed, re-parented onto E1)" in out, out
    code, out = run("convert", "E4", "--to", "differential")
    assert code == 0 and "E4: incremental on E3 -> differential on E1" in out, out
    code, out = run("prune", "--keep-last", "1", "--dry-run")
    assert code == 0 and "would remove" in out
    code, out = run("prune", "--keep-last", "1", "--json", "--dry-run")
    doc = json.loads(out)
    assert [d["entry"] for d in doc["remove"]] == ["E1", "E3"]
    code, out = run("prune")
    assert code == 2 and "no retention policy" in out
    code, out = run("gc")
    assert code == 0 and "freed" in out, out
    code, out = run("verify", "--all", "--read-data")
    assert code == 0 and "no problems" in out, out
    code, out = run("verify")
    assert code == 2
    code, out = run("fsck")
    assert code == 0 and "no problems" in out


def test_verify_names_the_entries_a_bad_object_affects(setup: tuple[Path, Path]) -> None:
    repo, _area = setup
    from vml.plumbing import refs as refs_mod
    from vml.plumbing.chains import resolve_image
    from vml.plumbing.packreader import PackReader, pack_extents
    from vml.plumbing.repository import open_repository

    r = open_repository(repo)
    reader = PackReader(r)
    try:
        img = resolve_image(reader, refs_mod.read_refs(r).entries[1], "disk.img")
        assert img is not None
        victim = next(x.base for x in img.recipes.values() if x.base is not None)
    finally:
        reader.close()
        r.close()
    # Damage that block inside its pack.
    for idx in (repo / "objects" / "pack").glob("pack-*.idx"):
        pack = idx.with_suffix(".pack")
        for sha, off, length, _crc in pack_extents(idx, pack.stat().st_size):
            if sha == victim:
                with open(pack, "r+b") as f:
                    f.seek(off + length // 2)
                    b = f.read(1)
                    f.seek(off + length // 2)
                    f.write(bytes([b[0] ^ 0xFF]))
    code, out = run("verify", "--all")
    assert code == 7, out
    assert victim.hex()[:12] in out
    assert "entries affected: E1, E2, E3, E4" in out
    r = runner.invoke(app, ["verify", "E4", "--read-data", "--json"])
    doc = json.loads(r.stdout)  # the document on stdout, the error line on stderr
    assert r.exit_code == 7 and not doc["clean"] and "E4" in doc["affected"]
    assert r.stderr.startswith("vml: verify found ") and len(r.stderr.splitlines()) == 1
    # gc keeps whole-live packs as they are (it does not read them): the damage stays visible.
    code, out = run("gc")
    assert code == 0
    code, out = run("verify", "--all")
    assert code == 7


def test_graph_of_a_chain_deeper_than_python_recursion(capsys: pytest.CaptureFixture[str]) -> None:
    """``log --graph`` draws a chain of 1,100 entries (a VM saved for months); it once recursed."""
    from vml.cli.render import print_log
    from vml.porcelain.log import LogEntry, LogResult

    n = 1100
    entries = {
        f"E{i}": LogEntry(
            id=f"E{i}",
            kind="incremental" if i > 1 else "full",
            parent=f"E{i - 1}" if i > 1 else None,
            commit=f"{i:040x}",
            message="",
            created="2026-01-01T00:00:00+00:00",
            stored_bytes=0,
            logical_bytes=0,
            read_bytes=0,
            children=[f"E{i + 1}"] if i < n else [],
        )
        for i in range(1, n + 1)
    }
    print_log(LogResult(entries, ["E1"]), True, set())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == n and lines[0].startswith("E1 ")
    assert lines[-1].startswith(" " * 4 * (n - 2) + "└── E1100 ")


def test_log_max_count(setup: tuple[Path, Path]) -> None:
    """``log -n N``: the N entries ``log`` lists first, in every form (#12).

    Plain: the first N lines.  ``--json``: those entries, in the JSON's own
    order, ``children`` among them.  ``--graph``: the trees they make, a
    tree whose parent is left out saying which parent that is.  N beyond
    the entries prints what ``log`` prints.  A bad N: one line, exit 2.
    """
    _repo, area = setup
    assert run("restore", "E2", str(area))[0] == 0
    edit(area / "disk.img", 5000, b"branch" * 100)
    assert run("commit", str(area), "-m", "on E2", "-q")[0] == 0  # E5 <- E2
    for scope in (["--all"], []):  # the whole forest; the area's tree (all of it here)
        code, full = run("log", *scope)
        lines = full.splitlines()
        assert code == 0 and [ln.split()[0] for ln in lines] == ["E5", "E4", "E3", "E2", "E1"]
        for n in (1, 2, 5):
            code, out = run("log", *scope, "-n", str(n))
            assert code == 0 and out.splitlines() == lines[:n]
        assert run("log", *scope, "--max-count", "9") == (0, full)
        for form in (["--json"], ["--graph"]):
            assert run("log", *scope, *form, "-n", "9") == run("log", *scope, *form)
    whole = json.loads(run("log", "--json")[1])
    doc = json.loads(run("log", "--json", "-n", "2")[1])
    assert [d["id"] for d in doc] == [d["id"] for d in whole if d["id"] in ("E4", "E5")]
    assert [(d["parent"], d["children"]) for d in doc] == [("E3", []), ("E2", [])]
    code, graph = run("log", "--graph", "-n", "3")
    assert code == 0
    drawn = [(ln.split()[0], ln.split()[1], ln.split()[-1]) for ln in graph.splitlines()]
    assert drawn == [("E3", "incremental", "E2"), ("└──", "E4", "s3"), ("E5", "incremental", "E2")]
    assert "parent E2" in graph.splitlines()[0] and "parent" not in graph.splitlines()[1]
    for bad in ("0", "-1", "x", "1.5", ""):
        res = runner.invoke(app, ["log", "-n", bad])
        assert res.exit_code == 2 and res.stdout == "", bad
        [line] = res.stderr.splitlines()
        assert line.startswith("vml: ") and "--max-count" in line, line
