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


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``root``'s package it imports, anywhere in its body.

    Imports inside functions and under ``TYPE_CHECKING`` count: a cycle
    through them is still two modules that cannot be understood apart.
    """
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
                # `from pkg import mod` imports the module; `from mod import name`, mod.
                sub = [t for t in targets[:-1] if t in files]
                targets = sub or [base]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_no_import_cycle_anywhere_in_vml() -> None:
    graph = import_graph(ROOT)
    assert "vml.cli.app" in graph and "vml.porcelain.commit" in graph["vml.cli.entries"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_the_entry_points_import_the_root_cli_app() -> None:
    """Command groups build on ``cli.common``; the root app imports them, never the reverse."""
    graph = import_graph(ROOT)
    users = sorted(m for m, edges in graph.items() if "vml.cli.app" in edges)
    assert users == ["vml.__main__"]
    users = sorted(m for m, edges in graph.items() if "vml.cli.root" in edges)
    assert users == ["vml.cli.app"]


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a as alias\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import pkg.sub\n")
    assert find_cycle(import_graph(pkg)) is None


def test_vml_starts_without_loading_porcelain_plumbing_or_dulwich() -> None:
    """Each command imports what it needs when it runs: `vml --help` pays for none of it."""
    import subprocess
    import sys

    code = "import sys, vml.cli.root; print(' '.join(sorted(sys.modules)))"
    env = {"PYTHONPATH": str(ROOT.parent), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    loaded = res.stdout.split()
    assert "vml.cli.entries" in loaded
    heavy = [m for m in loaded if m.startswith(("vml.porcelain", "vml.plumbing", "dulwich"))]
    assert heavy == []


def test_functions_and_files_stay_small() -> None:
    """Functions under ~80 lines (or a ``# long:`` comment saying why), files under ~800.

    The code changes most where it is largest; keeping each piece readable
    at once is what lets a newcomer change it safely.
    """
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        assert len(lines) <= 850, f"{path.name} has {len(lines)} lines: split it by concept"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                size = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                if size > 80 and "# long:" not in body:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({size})")
    assert not too_long, too_long
