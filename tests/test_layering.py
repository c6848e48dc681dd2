"""The layers depend one way: cli -> porcelain -> plumbing -> dulwich."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "vml"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def _sources(layer: str) -> list[Path]:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no sources in {layer}"
    return files


def test_plumbing_uses_no_ui_no_upper_layers_no_environment() -> None:
    banned = ("typer", "rich", "click", "vml.porcelain", "vml.cli")
    for path in _sources("plumbing"):
        text = path.read_text()
        for mod in _imports(path):
            assert not mod.startswith(banned), f"{path.name} imports {mod}"
        assert "os.environ" not in text and "getenv" not in text, (
            f"{path.name} reads the environment"
        )
        assert "sys.exit" not in text, f"{path.name} exits"
        assert "print(" not in text, f"{path.name} prints"


def test_porcelain_uses_no_ui_and_never_prints() -> None:
    for path in _sources("porcelain"):
        text = path.read_text()
        for mod in _imports(path):
            assert not mod.startswith(("typer", "rich", "click", "vml.cli")), (
                f"{path.name} imports {mod}"
            )
        assert "print(" not in text, f"{path.name} prints"
        assert "os.environ" not in text and "sys.exit" not in text, path.name


def test_the_layering_test_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import rich\nfrom vml.porcelain import commit\n")
    assert {"rich", "vml.porcelain"} <= _imports(bad)


def test_vm_knowledge_touches_no_git_storage() -> None:
    """``vml.plumbing.vm`` reads VMs; storage lives in the rest of plumbing."""
    for path in _sources("plumbing/vm"):
        for mod in _imports(path):
            if mod.startswith("vml."):
                assert mod == "vml.errors" or mod.startswith("vml.plumbing.vm"), (
                    f"{path.name} imports {mod}"
                )
            if mod.startswith("dulwich"):
                assert mod == "dulwich.ignore", f"{path.name} imports {mod}"


def test_plumbing_tests_build_entries_without_porcelain() -> None:
    """Plumbing is tested on its own: its tests import no porcelain or CLI."""
    tests = sorted((ROOT.parent / "tests" / "plumbing").rglob("*.py"))
    assert tests
    for path in tests:
        for mod in _imports(path):
            assert not mod.startswith(("vml.porcelain", "vml.cli")), f"{path.name} imports {mod}"
