"""Ignore rules: defaults for hypervisor litter, .vmlignore in gitignore syntax."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vml.plumbing.vm.ignore import IgnoreRules


@pytest.mark.parametrize(
    ("path", "is_dir"),
    [
        ("vmware.log", False),
        ("vmware-1.log", False),
        ("VMware-2.log", False),  # defaults ignore case
        ("sub/vmware-0.log", False),
        ("mksSandbox.log", False),
        ("disk.vmdk.lck", True),
        ("disk.vmdk.lck/M12345.lck", False),
        ("vm.vmx.lck", False),
        ("vmware-vmx-1234.dmp", False),
        ("vmx-vm-123.vswp", False),
        ("Logs/VBox.log", False),
        ("Logs/VBox.log.1", False),
        ("Logs/VBoxHardening.log", False),
        ("vms/linux/Logs/VBox.log.3", False),
        ("VBox.log", False),
        ("linux.vbox-tmp", False),
        (".vml", True),
        (".vml/objects/pack", False),
        ("sub/.vml", True),
    ],
)
def test_defaults_ignore(tmp_path: Path, path: str, is_dir: bool) -> None:
    assert IgnoreRules.load(tmp_path).is_ignored(path, is_dir)


@pytest.mark.parametrize(
    ("path", "is_dir"),
    [
        ("vm.vmx", False),
        ("disk.vmdk", False),
        ("disk-flat.vmdk", False),
        ("vm.nvram", False),
        ("vm.vmss", False),
        ("vm.vmem", False),
        ("linux.vbox", False),
        ("linux.vbox-prev", False),
        ("Snapshots", True),
        ("Snapshots/{uuid}.sav", False),
        ("Logs", True),
        ("notes.log", False),  # a log outside Logs/ may be the user's
        (".vmlignore", False),
        ("", True),
    ],
)
def test_defaults_keep(tmp_path: Path, path: str, is_dir: bool) -> None:
    assert not IgnoreRules.load(tmp_path).is_ignored(path, is_dir)


def test_vmlignore_extends_and_overrides(tmp_path: Path) -> None:
    (tmp_path / ".vmlignore").write_text(
        "# user rules\n*.iso\nscratch/\n!vmware.log\n.vml\n!.vml/\n"
    )
    rules = IgnoreRules.load(tmp_path)
    assert rules.is_ignored("a.iso")
    assert rules.is_ignored("sub/b.iso")
    assert rules.is_ignored("scratch", is_dir=True)
    assert rules.is_ignored("scratch/deep/file")
    assert not rules.is_ignored("vmware.log")  # the user re-included a default
    assert rules.is_ignored("vmware-1.log")  # other defaults still apply
    assert rules.is_ignored(".vml", is_dir=True)  # cannot be re-included
    assert not rules.is_ignored("vm.vmdk")


def test_vmlignore_itself_is_kept(tmp_path: Path) -> None:
    (tmp_path / ".vmlignore").write_text("*\n!*.vmx\n")
    rules = IgnoreRules.load(tmp_path)
    assert rules.is_ignored("vm.vmdk")
    assert not rules.is_ignored("vm.vmx")
    assert not rules.is_ignored(".vmlignore")  # saved with the VM, even under "*"
    assert rules.is_ignored("sub/.vmlignore")  # only the root one is special


def test_vmlignore_is_case_sensitive(tmp_path: Path) -> None:
    (tmp_path / ".vmlignore").write_text("*.iso\n")
    rules = IgnoreRules.load(tmp_path)
    assert rules.is_ignored("a.iso")
    assert not rules.is_ignored("A.ISO")


def test_path_forms(tmp_path: Path) -> None:
    rules = IgnoreRules.load(tmp_path)
    assert rules.is_ignored("./vmware.log")
    assert rules.is_ignored("disk.vmdk.lck/", is_dir=True)
    assert rules.is_ignored("Logs\\VBox.log")


def test_unreadable_vmlignore_is_empty(tmp_path: Path) -> None:
    (tmp_path / ".vmlignore").mkdir()
    rules = IgnoreRules.load(tmp_path)
    assert rules.user_patterns == ()
    assert rules.is_ignored("vmware.log")


def test_missing_area(tmp_path: Path) -> None:
    assert IgnoreRules.load(tmp_path / "nope").is_ignored("vmware.log")


@pytest.mark.compat
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_user_rules_agree_with_git(tmp_path: Path) -> None:
    patterns = "*.iso\nbuild/\n!keep.iso\n/root-only\ndocs/**/*.md\na?c\n[xy].img\n\\#hash\n"
    (tmp_path / ".vmlignore").write_text(patterns)
    (tmp_path / ".gitignore").write_text(patterns)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    paths = [
        "x.iso",
        "keep.iso",
        "sub/x.iso",
        "build/out",
        "root-only",
        "sub/root-only",
        "docs/a/b/c.md",
        "docs/c.md",
        "abc",
        "abbc",
        "x.img",
        "z.img",
        "#hash",
        "plain.txt",
    ]
    out = subprocess.run(
        ["git", "-C", str(tmp_path), "check-ignore", "--no-index", *paths],
        capture_output=True,
        text=True,
    ).stdout.split()
    rules = IgnoreRules.load(tmp_path)
    # Only compare paths no default rule touches, so this tests the user rules.
    assert {p for p in paths if rules.is_ignored(p)} == set(out)
