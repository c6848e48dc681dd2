"""Every command's ``--json`` output against docs/JSON.md, which this test reads.

The document lists each command's output type and every object field by
field; the test runs each command on real repositories (with a remote, a
clone, a damaged copy) and checks each output in both directions: every
listed field is there with its type, and no other field.  So the document
and the code cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer.main
from dulwich.objects import Blob
from dulwich.repo import Repo
from typer.testing import CliRunner

from tests.conftest import edit, make_area
from vml.cli.root import app

DOC = Path(__file__).resolve().parents[2] / "docs" / "JSON.md"
runner = CliRunner()


# --- the document --------------------------------------------------------------


@dataclass
class JsonDoc:
    """What docs/JSON.md says: each command's output type, each object's fields."""

    commands: dict[str, str] = field(default_factory=dict)  # "remote add" -> "Remote"
    objects: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> field -> type
    bases: set[str] = field(default_factory=set)  # objects others take all the fields of


_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|")


def parse_doc(text: str) -> JsonDoc:
    """Read the command table and every object's field table."""
    doc = JsonDoc()
    bases: dict[str, str] = {}
    section = current = ""
    for line in text.splitlines():
        if line.startswith("## "):
            section, current = line[3:].strip(), ""
        elif line.startswith("### "):
            current = line[4:].strip()
            doc.objects[current] = {}
        elif current and (m := re.search(r"All the fields of \*\*(\w+)\*\*", line)):
            bases[current] = m.group(1)
        elif m := _ROW.match(line):
            name, typ = m.group(1), m.group(2)
            if section == "Commands":
                assert name.startswith("vml "), line
                doc.commands[name.removeprefix("vml ")] = typ
            elif current:
                doc.objects[current][name] = typ
    for name, base in bases.items():
        doc.objects[name] = {**doc.objects[base], **doc.objects[name]}
    doc.bases = set(bases.values())
    return doc


def check(doc: JsonDoc, value: object, typ: str, where: str, seen: set[str]) -> list[str]:
    """Why ``value`` is not a ``typ`` (empty: it is); names the objects met in ``seen``."""
    alternatives = typ.split(" or ")
    if len(alternatives) > 1:
        found: list[str] = []
        for alt in alternatives:
            errors = check(doc, value, alt, where, seen)
            if not errors:
                return []
            found += errors
        return [f"{where}: {value!r:.60} is none of {typ}", *found]
    if typ.startswith(("list of ", "map of ")):
        inner = typ.split(" of ", 1)[1]
        if typ.startswith("list") and isinstance(value, list):
            return [
                e for i, v in enumerate(value) for e in check(doc, v, inner, f"{where}[{i}]", seen)
            ]
        if typ.startswith("map") and isinstance(value, dict):
            return [e for k, v in value.items() for e in check(doc, v, inner, f"{where}.{k}", seen)]
        return [f"{where}: {value!r:.60} is not a {typ}"]
    simple = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if typ in simple:
        return [] if simple[typ](value) else [f"{where}: {value!r:.60} is not a {typ}"]
    assert typ in doc.objects, f"{where}: docs/JSON.md does not describe {typ!r}"
    if not isinstance(value, dict):
        return [f"{where}: {value!r:.60} is not a {typ} object"]
    fields = doc.objects[typ]
    errors = [f"{where}: {typ} lacks {k!r}" for k in fields if k not in value]
    errors += [
        f"{where}: {typ} has {k!r}, which docs/JSON.md does not list"
        for k in value
        if k not in fields
    ]
    for k, v in value.items():
        if k in fields:
            errors += check(doc, v, fields[k], f"{where}.{k}", seen)
    if not errors:
        seen.add(typ)
    return errors


def command_options() -> dict[str, set[str]]:
    """Every command (``remote add`` for subcommands) and its option names."""
    found: dict[str, set[str]] = {}

    def walk(cmd: object, prefix: str) -> None:
        subs = getattr(cmd, "commands", {})
        for name, sub in subs.items():
            walk(sub, f"{prefix}{name} ")
        if prefix and not subs:
            params = getattr(cmd, "params", [])
            found[prefix.strip()] = {o for p in params for o in getattr(p, "opts", [])}

    walk(typer.main.get_command(app), "")
    return found


def json_commands() -> set[str]:
    """Every command that has a ``--json`` option."""
    return {c for c, opts in command_options().items() if "--json" in opts}


# --- running the commands --------------------------------------------------------


@dataclass
class World:
    """Where the commands run, and every ``--json`` document they printed."""

    base: Path
    mode: str = "--json"  # or "-q": the same commands must then print nothing on stdout
    outputs: dict[str, list[object]] = field(default_factory=dict)

    def vml(self, repo: str, *args: str | Path, code: int = 0) -> str:
        res = runner.invoke(app, ["--repo", str(self.base / repo), *map(str, args)])
        assert res.exit_code == code, (args, res.output)
        return res.stdout

    def json(self, command: str, repo: str, *args: str | Path, code: int = 0) -> None:
        """Run ``vml COMMAND ARGS --json`` (or ``-q``); keep what it printed."""
        out = self.vml(repo, *command.split(), *args, self.mode, code=code)
        # The whole of stdout is the one document (with -q: nothing at all).
        self.outputs.setdefault(command, []).append(
            json.loads(out) if self.mode == "--json" else out
        )


def _damaged_sources(w: World) -> None:
    """A source with a ref to a blob (clone: exit 7, said what did not arrive); a truncated index."""
    base = w.base
    w.vml("unused", "clone", base / "repo", base / "src2", "-q")
    git = Repo(str(base / "src2"))
    blob = Blob.from_string(b"not an entry")
    git.object_store.add_object(blob)
    git.refs[b"refs/vml/entries/99"] = blob.id
    git.close()
    w.json("clone", "unused", base / "src2", base / "partial", code=7)
    w.vml("unused", "clone", base / "repo", base / "packs", "-q")
    pack = max(
        (base / "packs" / "objects" / "pack").glob("pack-*.pack"), key=lambda p: p.stat().st_size
    )
    idx = pack.with_suffix(".idx")
    idx.chmod(0o644)
    idx.write_bytes(idx.read_bytes()[:100])
    w.json("gc", "packs", "--repair")


def _flip_a_block(repo: Path) -> None:
    """Damage the middle byte of the largest object in the repository's biggest pack."""
    from vml.plumbing.packreader import pack_extents

    pack = max((repo / "objects" / "pack").glob("pack-*.pack"), key=lambda p: p.stat().st_size)
    extents = list(pack_extents(pack.with_suffix(".idx"), pack.stat().st_size))
    _sha, off, length, _crc = max(extents, key=lambda x: x[2])
    with open(pack, "r+b") as f:
        f.seek(off + length // 2)
        b = f.read(1)
        f.seek(off + length // 2)
        f.write(bytes([b[0] ^ 0xFF]))


def make_world(base: Path, mode: str) -> World:
    """Run every command with ``mode`` (``--json`` or ``-q``): init, saves, a remote, damage."""
    w = World(base, mode)
    area, base = w.base / "area", w.base
    w.json("init", "repo", base / "repo", "--block-size", "64K")
    subprocess.run(["git", "-C", base / "repo", "config", "vml.autoPackLimit", "2"], check=True)
    make_area(area)
    w.json("commit", "repo", area, "-m", "one", "--tag", "t1")
    for i, flags in enumerate((["--differential"], [], [], [])):
        edit(area / "disk.img", 70_000 * i, b"%d" % i * 3000)
        w.json("commit", "repo", area, *flags)  # E2..E5; small packs get rolled up
    ext = base / "ext"  # a VM whose disk lies outside its folder
    ext.mkdir()
    (base / "shared").mkdir()
    (base / "shared" / "data-flat.vmdk").write_bytes(b"\2" * 4096)
    (ext / "data.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        'RW 8 FLAT "../shared/data-flat.vmdk" 0\n'
    )
    w.json("commit", "repo", ext, "--include-external")
    w.json("checkout", "repo", "E2", base / "copy")
    w.json("restore", "repo", "E4", area)
    edit(area / "disk.img", 5000, b"s" * 3000)
    w.json("status", "repo", area)
    w.json("commit", "repo", area, "-m", "six")  # E6
    w.json("log", "repo", "--all")
    w.json("show", "repo", "E3")
    w.json("areas", "repo")
    w.json("branch", "repo", "line", "E2")
    w.json("branch", "repo")
    w.json("tag", "repo", "t2", "E3")
    w.json("tag", "repo")
    w.json("tag", "repo", "-d", "t2")

    subprocess.run(["git", "init", "-q", "--bare", base / "server.git"], check=True)
    w.json("remote add", "repo", "origin", base / "server.git")
    w.json("remote list", "repo")
    w.json("push", "repo", "origin", "--all", "--tags")
    w.json("clone", "unused", base / "server.git", base / "bob")
    w.vml("bob", "checkout", "E2", base / "bob-area", "-q")
    edit(base / "bob-area" / "disk.img", 9000, b"b" * 3000)
    w.vml("bob", "commit", base / "bob-area", "-q")
    w.vml("bob", "push", "origin", "--all", "-q")
    w.json("fetch", "repo")
    w.json("pull", "repo")

    w.json("prune", "repo", "--keep-last", "1", "--dry-run")
    w.json("prune", "repo", "--keep-last", "1")
    w.json("convert", "repo", "E6", "--to", "full")
    w.json("rm", "repo", "E2", "--force")
    w.json("gc", "repo")
    w.json("verify", "repo", "--all")
    w.json("fsck", "repo")
    w.vml("unused", "clone", base / "repo", base / "damaged", "-q")
    _flip_a_block(base / "damaged")
    w.json("verify", "damaged", "--all", "--read-data", code=7)
    _damaged_sources(w)
    w.json("remote remove", "repo", "origin")
    _vm_steps(w)
    return w


# Commands and objects only a VM running under `vml run` (a real QEMU) shows.
QEMU_COMMANDS = {"run", "stop"}
QEMU_OBJECTS = {"Run", "Stop", "LiveSave", "RunState"}


def _vm_steps(w: World) -> None:
    """Describe a QEMU VM; with qemu-system there, run it, save it live, stop it."""
    lab = w.base / "lab"
    lab.mkdir()
    with open(lab / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    w.json(
        "vm init", "repo", lab, "--disk", lab / "disk.img", "--memory", "16M", "--network", "none"
    )
    if shutil.which("qemu-system-x86_64") is None:
        return
    try:
        w.json("run", "repo", lab)
        w.json("status", "repo", lab)
        w.json("commit", "repo", lab, "--tag", "live1")
        w.json("show", "repo", "live1")
    finally:
        w.json("stop", "repo", lab, "--kill")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("json"), "--json")


# --- the contract ------------------------------------------------------------------


def test_every_command_with_json_is_documented_and_run() -> None:
    doc = parse_doc(DOC.read_text())
    assert set(doc.commands) == json_commands()


def test_every_json_output_matches_the_document(world: World) -> None:
    doc = parse_doc(DOC.read_text())
    qemu = shutil.which("qemu-system-x86_64") is not None
    expected = set(doc.commands) - (set() if qemu else QEMU_COMMANDS)
    assert set(world.outputs) == expected, "the world runs every documented command"
    seen: set[str] = set()
    errors = [
        e
        for command, docs in world.outputs.items()
        for i, value in enumerate(docs)
        for e in check(doc, value, doc.commands[command], f"{command}#{i}", seen)
    ]
    assert errors == []
    # Every documented object met a real value (a list that stayed empty proves nothing).
    assert set(doc.objects) - doc.bases - (set() if qemu else QEMU_OBJECTS) <= seen


def test_quiet_prints_nothing_on_stdout_on_every_command(tmp_path: Path) -> None:
    """``-q``: the same commands as above print nothing but errors (#13)."""
    w = make_world(tmp_path, "-q")
    qemu = shutil.which("qemu-system-x86_64") is not None
    expected = set(parse_doc(DOC.read_text()).commands) - (set() if qemu else QEMU_COMMANDS)
    assert set(w.outputs) == expected
    assert {c: [o for o in outs if o] for c, outs in w.outputs.items() if any(outs)} == {}


def test_every_command_takes_quiet_and_json() -> None:
    """One contract: each command has -q, and --json (but the demo, a narrated tour)."""
    quiet = {c for c, opts in command_options().items() if "-q" in opts}
    assert quiet == set(command_options())
    assert json_commands() == set(command_options()) - {"demo"}


def test_the_checker_sees_missing_extra_and_mistyped_fields() -> None:
    doc = parse_doc(DOC.read_text())
    good = {"name": "origin", "url": "/srv/x.git"}
    assert check(doc, good, "Remote", "r", set()) == []
    assert check(doc, {"name": "origin"}, "Remote", "r", set()) == ["r: Remote lacks 'url'"]
    extra = check(doc, {**good, "x": 1}, "Remote", "r", set())
    assert extra == ["r: Remote has 'x', which docs/JSON.md does not list"]
    assert check(doc, {"name": 5, "url": ""}, "Remote", "r", set()) == ["r.name: 5 is not a string"]
    assert check(doc, [good, None], "list of Remote or null", "l", set()) != []
    assert check(doc, None, "list of Remote or null", "l", set()) == []
    assert check(doc, True, "integer", "i", set()) == ["i: True is not a integer"]
    # Inherited fields come along.
    assert set(doc.objects["Rewrite"]) < set(doc.objects["Removal"])
