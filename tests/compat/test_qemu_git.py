"""Real tools judge VML: qemu-img/qemu-io make and check the images, git checks the repository."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import TEST_BLOCK, edit, make_area, need
from vml.cli.root import app
from vml.plumbing.repository import Repository
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit
from vml.porcelain.names import create_branch

pytestmark = pytest.mark.compat
MiB = 1 << 20


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def qemu_io(image: Path, fmt: str, command: str) -> None:
    res = run("qemu-io", "-f", fmt, "-c", command, image)
    assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout + res.stderr


def git_fsck(repo: Path) -> None:
    res = run("git", f"--git-dir={repo}", "fsck", "--full", "--strict")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "error" not in res.stderr.lower() and "dangling" not in res.stdout, res.stderr


def git_parents(repo: Path) -> dict[str, list[str]]:
    res = run("git", f"--git-dir={repo}", "log", "--graph", "--all", "--format=%H %P")
    assert res.returncode == 0, res.stderr
    out: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        words = [w for w in line.split() if len(w) == 40]
        if words:
            out[words[0]] = words[1:]
    return out


def vml_log(repo: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    monkeypatch.chdir(cwd)
    res = CliRunner().invoke(app, ["--repo", str(repo), "log", "--all", "--json"])
    assert res.exit_code == 0, res.stderr
    items: list[dict[str, object]] = json.loads(res.stdout)
    return items


def check_same_forest(repo: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """git's parent links are exactly the entries' parent links."""
    items = vml_log(repo, cwd, monkeypatch)
    commit_of = {str(d["id"]): str(d["commit"]) for d in items}
    want = {str(d["commit"]): ([commit_of[str(d["parent"])]] if d["parent"] else []) for d in items}
    assert git_parents(repo) == want


def snapshot(image: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    dest = into / image.name
    shutil.copyfile(image, dest)
    return dest


@pytest.mark.parametrize(
    ("fmt", "name", "opts"),
    [
        ("qcow2", "disk.qcow2", []),
        ("vmdk", "disk.vmdk", ["-o", "subformat=monolithicSparse"]),
    ],
)
def test_images_made_by_qemu(
    repo: Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    name: str,
    opts: list[str],
) -> None:
    need("qemu-img")
    need("qemu-io")
    need("git")
    area = tmp_path / "area"
    area.mkdir()
    image = area / name
    res = run("qemu-img", "create", "-f", fmt, *opts, image, "64M")
    assert res.returncode == 0, res.stderr
    qemu_io(image, fmt, "write -P 0xab 0 256k")
    qemu_io(image, fmt, "write -P 0x11 20M 64k")
    saved = [snapshot(image, tmp_path / "saved1")]
    assert commit(repo, area, message="fresh").entry == "E1"

    qemu_io(image, fmt, "write -P 0xcd 1M 4k")
    qemu_io(image, fmt, "write -P 0x22 40M 128k")
    saved.append(snapshot(image, tmp_path / "saved2"))
    e2 = commit(repo, area)
    assert (e2.kind, e2.parent) == ("incremental", "E1")

    qemu_io(image, fmt, "write -P 0xef 8k 4k")
    qemu_io(image, fmt, "write -z 20M 64k")
    saved.append(snapshot(image, tmp_path / "saved3"))
    e3 = commit(repo, area, kind="differential")
    assert (e3.kind, e3.parent) == ("differential", "E1")

    for i, want in enumerate(saved, 1):
        out = tmp_path / f"out{i}"
        checkout(repo, f"E{i}", out)
        got = out / name
        cmp = run("qemu-img", "compare", "-f", fmt, "-F", fmt, want, got)
        assert cmp.returncode == 0 and "identical" in cmp.stdout, cmp.stdout + cmp.stderr
        chk = run("qemu-img", "check", "-f", fmt, got)
        assert chk.returncode == 0, chk.stdout + chk.stderr
        assert got.read_bytes() == want.read_bytes()

    restore(repo, "E2", area)
    cmp = run("qemu-img", "compare", saved[1], image)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    qemu_io(image, fmt, "write -P 0x77 2M 4k")
    assert commit(repo, area).parent == "E2"

    git_fsck(repo.path)
    check_same_forest(repo.path, tmp_path, monkeypatch)


def test_git_accepts_every_kind_of_repository_vml_makes(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full, incremental, differential (with and without a base), tags, branches, a
    restore that branches the tree, empty files and folders, an emptied disk."""
    need("git")
    area = tmp_path / "area"
    make_area(area, disk=12 * TEST_BLOCK)
    (area / "empty.txt").write_bytes(b"")
    (area / "sub" / "deeper").mkdir(parents=True)
    (area / "sub" / "deeper" / "x.cfg").write_text("x")
    (area / "hollow").mkdir()
    disk = area / "disk.img"
    commit(repo, area, tag="start")
    create_branch(repo, "main", None, area)
    for i in range(3):
        edit(disk, i * TEST_BLOCK, bytes([i + 1]) * 4096)
        commit(repo, area)
    edit(disk, 0, bytes(TEST_BLOCK))
    commit(repo, area, kind="differential")
    edit(disk, 5 * 4096, b"b" * 4096)
    commit(repo, area, base="E3")
    restore(repo, "E2", area)
    (area / "vm.vmx").chmod(0o755)
    commit(repo, area, message="after restore")
    disk.write_bytes(b"")
    commit(repo, area, kind="full", tag="emptied")
    other = tmp_path / "other"
    checkout(repo, "start", other)
    edit(other / "disk.img", 0, b"o" * 4096)
    commit(repo, other)

    git_fsck(repo.path)
    check_same_forest(repo.path, tmp_path, monkeypatch)
    # every entry is held by a ref git lists
    res = run("git", f"--git-dir={repo.path}", "for-each-ref", "--format=%(refname)")
    names = res.stdout.split()
    assert sum(n.startswith("refs/vml/entries/") for n in names) == 9
    assert "refs/tags/start" in names and "refs/heads/main" in names
    # git sees the same files in an entry's tree
    res = run("git", f"--git-dir={repo.path}", "ls-tree", "-r", "--name-only", "refs/vml/entries/1")
    listed = set(res.stdout.split())
    assert {"vml-entry.json", "files/vm.vmx", "files/sub/deeper/x.cfg"} <= listed
    assert any(n.startswith("images/disk.img/blocks/") for n in listed)
    shown = run("git", f"--git-dir={repo.path}", "show", "refs/vml/entries/1:files/vm.vmx")
    assert shown.stdout == (area / "vm.vmx").read_text()
