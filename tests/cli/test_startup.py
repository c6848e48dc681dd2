"""What ``vml`` pays at start-up: a command builds only itself, a save at rest imports no live-save code.

Users wait for every save, and start-up is a good part of a small one: the
command line of one command is built alone (``app._one_command``), and
modules only a running VM needs are imported only then.  Both must change
nothing users see.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command_name
from typer.testing import CliRunner

from vml.cli import app as app_mod

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _top_commands() -> list[str]:
    return [
        info.name or get_command_name(getattr(info.callback, "__name__", ""))
        for group in app_mod.GROUPS
        for info in group.commands.registered_commands
    ]


def test_every_command_alone_reads_its_command_line_as_the_whole_app_does() -> None:
    names = _top_commands()
    assert {"commit", "checkout", "log", "run", "stop", "gc"} <= set(names)
    for name in names:
        for args in ([name, "--help"], ["--repo", "/nonexistent", name, "--no-such-option"]):
            one = app_mod._one_command(args)
            assert one is not None, name
            alone, whole = runner.invoke(one, args), runner.invoke(app_mod.app, args)
            assert (alone.exit_code, alone.stdout, alone.stderr) == (
                whole.exit_code,
                whole.stdout,
                whole.stderr,
            ), args


@pytest.mark.parametrize(
    "args",
    [[], ["--help"], ["--version"], ["no-such-command"], ["vm", "init"], ["--repo=x", "commit"]],
)
def test_the_root_help_nested_or_unknown_commands_use_the_whole_app(args: list[str]) -> None:
    assert app_mod._one_command(args) is None


def test_completion_uses_the_whole_app(monkeypatch: pytest.MonkeyPatch) -> None:
    assert app_mod._one_command(["commit"]) is not None
    monkeypatch.setenv("_VML_COMPLETE", "complete_bash")
    assert app_mod._one_command(["commit"]) is None


def test_a_save_at_rest_imports_no_live_save_code() -> None:
    """What the commit command imports before it runs: nothing only a running VM needs."""
    code = (
        "import sys\n"
        "from vml.cli import app\n"
        "one = app._one_command(['commit'])\n"
        "import typer.main; typer.main.get_command(one)\n"
        "import vml.porcelain.commit\n"
        "only_live = ['vml.plumbing.vm.live', 'vml.plumbing.vm.foreign', "
        "'vml.plumbing.vm.libvirt', 'socket', 'xml.etree.ElementTree']\n"
        "print(sorted(m for m in only_live if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
