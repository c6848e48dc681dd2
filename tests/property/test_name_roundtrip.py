"""Which names round-trip: every name a Linux file system accepts.

Names are bytes (any but ``/`` and NUL, up to 255 per component), not
necessarily UTF-8; some look like VML's own temporary files, some are names
git treats specially (``.git``, ``.gitmodules``, NTFS aliases).  Each is
saved, verified, checked out elsewhere byte for byte under the same bytes,
saved again after a change, and the repository stays clean for
``git fsck --full --strict``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_BLOCK, need
from tests.reliability.helpers import vml_in_process as vml
from vml.plumbing.entries import escape_name, unescape_name
from vml.plumbing.repository import Repository, init_repository
from vml.plumbing.vm.ignore import IgnoreRules
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit
from vml.porcelain.verify import verify

SPECIAL = [
    b".git",
    b".GIT",
    b".git.",
    b"git~1",
    b"GIT~1",
    b".gitmodules",
    b".gitattributes",
    b"gi7eba~1",
    b"%2Egit",
    b"%",
    b"100%25",
    b"~",
    b".x.vml-tmp",
    b".vml-tmp-1-1",
    b"caf\xe9",
    b"\xff\xfe\xfd",
    b"a\\b",
    b"line\nbreak",
    b"tab\there",
    b"-rf",
    b" lead and trail ",
    b"\x1b[31mred",
    "Ωμέγα".encode(),
    b"n" * 255,
    b"\xc3" * 255,
]


def _listing(folder: Path) -> dict[bytes, tuple[bytes, int]]:
    """Every file below ``folder`` by its path's bytes: (content, exec bit)."""
    out: dict[bytes, tuple[bytes, int]] = {}
    root = os.fsencode(folder)
    for d, dirs, files in os.walk(root):
        if d == root:
            dirs[:] = [x for x in dirs if x != b".vml"]
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (fh.read(), os.stat(p).st_mode & 0o100)
    return out


def _put(area: Path, rel: bytes, data: bytes) -> None:
    p = os.path.join(os.fsencode(area), rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)


def _round_trip(repo: Repository, area: Path, out: Path) -> None:
    first = commit(repo, area)
    assert verify(repo, [first.entry], read_data=True).clean
    checkout(repo, first.entry, out)
    assert _listing(out) == _listing(area)
    # A change and a second save: the chain resolves the same names.
    for rel in list(_listing(area))[:2]:
        _put(area, rel, b"changed " + rel)
    second = commit(repo, area)
    assert verify(repo, [second.entry], read_data=True).clean
    res = checkout(repo, second.entry, out)
    assert res.in_place and _listing(out) == _listing(area)


def _fsck(repo: Repository) -> None:
    need("git")
    run = subprocess.run(
        ["git", "--git-dir", str(repo.path), "fsck", "--full", "--strict"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def test_special_names_round_trip(repo: Repository, tmp_path: Path) -> None:
    area = tmp_path / "area"
    for i, name in enumerate(SPECIAL):
        _put(area, name, b"small %d" % i)
        _put(area, b"d-" + str(i).encode() + b"/" + name + b"/inner", b"in a folder")
    _put(area, SPECIAL[-2], os.urandom(2 * TEST_BLOCK + 5))  # a 255-byte image
    (area / ".git").unlink()
    _put(area, b".git/config", b"[core]\n\tbare = false\n")
    _put(area, b".gitmodules", b'[submodule "x"]\n\tpath = ../../x\n\turl = --upload-pack=x\n')
    _round_trip(repo, area, tmp_path / "out")
    _fsck(repo)


def test_status_log_and_show_print_any_name(repo: Repository, tmp_path: Path) -> None:
    area = tmp_path / "area"
    for name in SPECIAL:
        _put(area, name, b"x")
    commit(repo, area)
    for args in (["show", "E1"], ["show", "E1", "--json"], ["status", str(area)], ["log"]):
        run = vml(repo.path, *args)
        assert run.code == 0, run


def _names() -> st.SearchStrategy[bytes]:
    byte = st.integers(1, 255).filter(lambda b: b != 0x2F)
    return (
        st.lists(byte, min_size=1, max_size=255)
        .map(bytes)
        .filter(lambda n: n not in (b".", b"..", b".vml"))
    )


_RULES = IgnoreRules([])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(st.lists(_names(), min_size=1, max_size=3), min_size=1, max_size=6))
def test_any_names_round_trip(names: list[list[bytes]]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vml-names-"))
    repo = init_repository(tmp / "repo", TEST_BLOCK)
    try:
        area = tmp / "area"
        area.mkdir()
        made: set[bytes] = set()
        for i, parts in enumerate(names):
            rel = b"/".join(parts)
            # A name both a folder and a file, or one the default rules ignore: skip.
            if any(rel.startswith(m + b"/") or m.startswith(rel + b"/") for m in made):
                continue
            if any(
                _RULES.is_ignored(os.fsdecode(b"/".join(parts[: k + 1])), False)
                for k in range(len(parts))
            ):
                continue
            _put(area, rel, b"%d" % i)
            made.add(rel)
        if not made:
            return
        _round_trip(repo, area, tmp / "out")
        _fsck(repo)
    finally:
        repo.close()
        shutil.rmtree(tmp, ignore_errors=True)


@given(name=_names())
def test_escaping_is_exact_and_safe_for_git(name: bytes) -> None:
    stored = escape_name(os.fsdecode(name))
    assert unescape_name(stored) == os.fsdecode(name)
    assert not stored.startswith(b".") and b"~" not in stored
    assert b"/" not in stored and b"\0" not in stored


@pytest.mark.parametrize("length", [256, 300])
def test_verify_catches_an_entry_that_cannot_be_written(tmp_path: Path, length: int) -> None:
    from tests.reliability.test_hostile_repository import forge

    repo_path = tmp_path / "repo"
    init_repository(repo_path, TEST_BLOCK).close()
    area = tmp_path / "area"
    _put(area, b"vm.vmx", b"x")
    assert vml(repo_path, "commit", "-q", area).code == 0

    def edit(git: object, root: object, meta: dict[str, object]) -> None:
        files = meta["files"]
        assert isinstance(files, list)
        files[0]["path"] = "n" * length  # more than a Linux name may hold

    forge(repo_path, edit)
    run = vml(repo_path, "verify", "E2", "--read-data")
    assert run.code != 0 and "255 bytes" in run.out + run.err, run
    run = vml(repo_path, "checkout", "E2", tmp_path / "t")
    assert run.code == 7 and not (tmp_path / "t").exists()
