"""Clone and fetch from a damaged repository: all or nothing per ref, and said exactly.

The rule (FORMAT.md, "Sharing"): a ref is tracked, and the entries it
reaches numbered, only when every object it reaches arrived and reads.  A
local source (dulwich serves it in this process) sends what it can: the
rest is named ("did not arrive"), the command exits 7, and nothing here
refers to a missing object (``git fsck --full --strict`` passes).  A real
git server (``git daemon``) fails the whole transfer: nothing is kept, and
the entries it can still send are fetched by name.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dulwich.objects import Blob
from dulwich.repo import Repo

from tests.compat.test_sharing_servers import free_port, wait_for_port
from tests.conftest import digest_area, edit, make_area, need
from tests.reliability.helpers import git_fsck
from tests.reliability.helpers import vml_in_process as vml

pytestmark = pytest.mark.compat


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """E1 <- E2 from area a, E3 (full) from area b."""
    repo = tmp_path / "src.git"
    assert vml(repo, "init", "--block-size", "64K", repo).code == 0
    make_area(tmp_path / "a", seed=1)
    make_area(tmp_path / "b", seed=2)
    assert vml(repo, "commit", "-q", tmp_path / "a").code == 0
    edit(tmp_path / "a" / "disk.img", 300_000, b"x" * 5000)
    assert vml(repo, "commit", "-q", tmp_path / "a").code == 0
    assert vml(repo, "commit", "-q", tmp_path / "b").code == 0
    return repo


def _commit(repo: Path, n: int) -> str:
    return (repo / "refs" / "vml" / "entries" / str(n)).read_text().strip()


def _lose_commit(n: int) -> Callable[[Path], None]:
    def damage(repo: Path) -> None:
        c = _commit(repo, n)
        (repo / "objects" / c[:2] / c[2:]).unlink()

    return damage


def _ref_to_blob(repo: Path) -> None:
    git = Repo(str(repo))
    blob = Blob.from_string(b"not an entry")
    git.object_store.add_object(blob)
    git.refs[b"refs/vml/entries/3"] = blob.id
    git.close()


@pytest.mark.parametrize(
    ("damage", "missing", "arrived"),
    [
        (_lose_commit(3), ["E3"], {"E1", "E2"}),
        (_ref_to_blob, ["E3"], {"E1", "E2"}),
    ],
    ids=["leaf-commit-missing", "ref-to-a-blob"],
)
def test_a_local_clone_names_exactly_what_did_not_arrive(
    tmp_path: Path,
    source: Path,
    damage: Callable[[Path], None],
    missing: list[str],
    arrived: set[str],
) -> None:
    damage(source)
    run = vml(tmp_path / "unused", "clone", source, tmp_path / "copy")
    assert run.code == 7, run
    for name in missing:
        assert f"did not arrive: {name} " in run.err, run.err
    copy = tmp_path / "copy"
    got = json.loads(vml(copy, "log", "--json").out)
    assert {e["id"] for e in got} == arrived and all(e["damage"] is None for e in got)
    git_fsck(copy)  # no ref refers to anything missing
    tracked = subprocess.run(
        ["git", "--git-dir", str(copy), "for-each-ref", "--format=%(refname)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in missing:
        assert f"refs/vml/remotes/origin/entries/{name[1:]}" not in tracked
    assert vml(copy, "verify", "--all", "--read-data").code == 0
    assert vml(copy, "fsck").code == 0
    # Fetching again says the same and changes nothing.
    run = vml(copy, "fetch")
    assert run.code == 7 and "no new entries" in run.out, run


def test_a_local_source_that_cannot_send_a_chain_fails_whole(tmp_path: Path, source: Path) -> None:
    """E2 is advertised but built on E1, whose commit is gone: the transfer stops, nothing is kept."""
    _lose_commit(1)(source)
    run = vml(tmp_path / "unused", "clone", source, tmp_path / "copy")
    assert run.code == 1 and "its repository is damaged" in run.err, run
    assert not (tmp_path / "copy").exists()
    copy = tmp_path / "rescue"
    assert vml(copy, "init", "--block-size", "64K", copy).code == 0
    assert vml(copy, "remote", "add", "origin", source).code == 0
    run = vml(copy, "fetch", "origin", "E3")
    assert run.code == 0, run
    assert {e["id"] for e in json.loads(vml(copy, "log", "--json").out)} == {"E1"}
    git_fsck(copy)


@pytest.fixture
def daemon_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``git daemon`` on 127.0.0.1 serving a folder: (base URL, folder)."""
    need("git")
    root = tmp_path / "served"
    root.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--listen=127.0.0.1",
            f"--port={port}",
            f"--base-path={root}",
            "--export-all",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        yield f"git://127.0.0.1:{port}", root
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_git_server_that_cannot_send_fails_whole_and_fetch_by_name_rescues(
    tmp_path: Path, source: Path, daemon_root: tuple[str, Path]
) -> None:
    base, root = daemon_root
    _lose_commit(3)(source)
    source.rename(root / "src.git")
    url = f"{base}/src.git"
    run = vml(tmp_path / "unused", "clone", url, tmp_path / "copy")
    assert run.code != 0 and "Traceback" not in run.err, run
    assert not (tmp_path / "copy").exists()  # nothing half made
    # What the server can still send arrives when asked for by name.
    copy = tmp_path / "rescue"
    assert vml(copy, "init", "--block-size", "64K", copy).code == 0
    assert vml(copy, "remote", "add", "origin", url).code == 0
    run = vml(copy, "fetch", "origin", "E2")
    assert run.code == 0, run
    got = {e["id"]: e for e in json.loads(vml(copy, "log", "--json").out)}
    assert set(got) == {"E1", "E2"}
    assert vml(copy, "checkout", "-q", "E2", tmp_path / "e2").code == 0
    assert digest_area(tmp_path / "e2") == digest_area(tmp_path / "a")
    git_fsck(copy)
