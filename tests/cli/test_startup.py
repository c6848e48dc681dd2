"""What ``vml`` pays at start-up: a command builds only itself, a save at rest imports no live-save code.

Users wait for every save, and start-up is a good part of a small one: the
command line of one command is built alone (``root.one_command``), and
modules only a running VM needs are imported only then.  Both must change
nothing users see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.main import get_command_name
from typer.testing import CliRunner

import vml
from tests.conftest import edit, make_area
from vml.cli import root, toplevel
from vml.errors import NothingToCommit

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _top_commands() -> list[str]:
    return [
        info.name or get_command_name(getattr(info.callback, "__name__", ""))
        for group in root.GROUPS
        for info in group.commands.registered_commands
    ]


def test_every_command_alone_reads_its_command_line_as_the_whole_app_does() -> None:
    names = _top_commands()
    assert {"commit", "checkout", "log", "run", "stop", "gc"} <= set(names)
    for name in names:
        for args in ([name, "--help"], ["--repo", "/nonexistent", name, "--no-such-option"]):
            one = root.one_command(args)
            assert one is not None, name
            alone, whole = runner.invoke(one, args), runner.invoke(root.app, args)
            assert (alone.exit_code, alone.stdout, alone.stderr) == (
                whole.exit_code,
                whole.stdout,
                whole.stderr,
            ), args


def test_the_table_of_commands_is_what_the_groups_register() -> None:
    """``one_command`` imports one group, found in ``toplevel.COMMANDS``: it must not go stale."""
    assert tuple(g.__name__.rpartition(".")[2] for g in root.GROUPS) == toplevel.GROUP_MODULES
    registered = {
        info.name or get_command_name(getattr(info.callback, "__name__", "")): group
        for group in root.GROUPS
        for info in group.commands.registered_commands
    }
    assert {k: f"vml.cli.{v}" for k, v in toplevel.COMMANDS.items()} == {
        k: g.__name__ for k, g in registered.items()
    }


@pytest.mark.parametrize(
    "args",
    [[], ["--help"], ["--version"], ["no-such-command"], ["vm", "init"], ["--repo=x", "commit"]],
)
def test_the_root_help_nested_or_unknown_commands_use_the_whole_app(args: list[str]) -> None:
    assert root.one_command(args) is None


def test_completion_uses_the_whole_app(monkeypatch: pytest.MonkeyPatch) -> None:
    assert root.one_command(["commit"]) is not None
    monkeypatch.setenv("_VML_COMPLETE", "complete_bash")
    assert root.one_command(["commit"]) is None


def test_a_save_at_rest_imports_no_live_save_code() -> None:
    """What the commit command imports before it runs: nothing only a running VM needs."""
    code = (
        "import sys\n"
        "from vml.cli import root\n"
        "one = root.one_command(['commit'])\n"
        "import typer.main; typer.main.get_command(one)\n"
        "import vml.porcelain.commit\n"
        "only_live = ['vml.plumbing.vm.live', 'vml.plumbing.vm.foreign', "
        "'vml.plumbing.vm.libvirt', 'vml.plumbing.vm.qmp', 'vml.plumbing.vm.resume', "
        "'socket', 'xml.etree.ElementTree']\n"
        "print(sorted(m for m in only_live if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def _run_main(args: list[str]) -> tuple[int, str, set[str]]:
    """Run ``vml ARGS`` as the console script does; its exit code, stdout and loaded modules."""
    code, stdout, _stderr, modules = _run_main_err(args)
    return code, stdout, modules


def _run_main_err(args: list[str]) -> tuple[int, str, str, set[str]]:
    """:func:`_run_main`, with what the command wrote on stderr."""
    code = (
        "import sys\n"
        "from vml.cli.app import main\n"
        "sys.argv = ['vml', *sys.argv[1:]]\n"
        "code = 0\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    code = e.code or 0\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)) + '\\n')\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    stderr, _, modules = done.stderr.rpartition("\nMODULES ")
    return done.returncode, done.stdout, stderr, set(modules.split())


def test_version_prints_what_the_whole_app_does_without_building_it() -> None:
    """``vml --version`` answers before typer, rich or any command is imported."""
    code, stdout, modules = _run_main(["--version"])
    whole = runner.invoke(root.app, ["--version"])
    assert (code, stdout) == (whole.exit_code, whole.stdout) == (0, f"vml {vml.__version__}\n")
    assert "vml.cli.app" in modules
    heavy = [
        m
        for m in modules
        if m.partition(".")[0] in ("typer", "rich", "click", "dulwich")
        or m.startswith(("vml.cli.root", "vml.porcelain", "vml.plumbing"))
    ]
    assert heavy == []


#: What reading commands must not load: the save machinery, pack writing, area inspection,
#: the git client.
NOT_FOR_READING = (
    "vml.porcelain.commit",
    "vml.plumbing.saving",
    "vml.plumbing.packwriter",
    "vml.plumbing.images",
    "vml.plumbing.cache",
    "vml.plumbing.vm.inspect",
    "vml.plumbing.vm.formats",
    "vml.plumbing.vm.qemu",
    "dulwich.client",
)
#: What listing names must not load besides: entries, packs and their chains.
NOT_FOR_NAMES = (*NOT_FOR_READING, "vml.plumbing.chains", "vml.plumbing.packreader")
#: What the status of an area saved as it is must not load: no image was read.
NOT_FOR_STATUS = (
    "vml.porcelain.commit",
    "vml.plumbing.saving",
    "vml.plumbing.images",
    "vml.plumbing.packwriter",
)


def test_reading_commands_load_only_what_they_use(tmp_path: Path) -> None:
    """``log``/``show`` load no save, pack-writing or VM code; ``tag``/``branch`` not even the packs.

    ``status`` of an area that nothing changed in loads no image code either.
    """
    repo = tmp_path / "repo"
    make_area(tmp_path / "area")
    for args in (["init", str(repo)], ["--repo", str(repo), "commit", str(tmp_path / "area")]):
        assert runner.invoke(root.app, args).exit_code == 0
    runs = {
        ("log",): ("vml.porcelain.log", NOT_FOR_READING, "E1"),
        ("show", "E1"): ("vml.porcelain.log", NOT_FOR_READING, "E1"),
        ("tag", "golden", "E1"): ("vml.porcelain.names", NOT_FOR_NAMES, "golden"),
        ("tag",): ("vml.porcelain.names", NOT_FOR_NAMES, "golden"),
        ("branch",): ("vml.porcelain.names", NOT_FOR_NAMES, ""),
        ("status", str(tmp_path / "area")): ("vml.porcelain.status", NOT_FOR_STATUS, "nothing"),
    }
    for args, (porcelain, unused, said) in runs.items():
        code, stdout, modules = _run_main(["--repo", str(repo), *args])
        assert code == 0 and said in stdout, (args, stdout)
        assert porcelain in modules
        assert [m for m in unused if m in modules] == [], args


def test_json_output_loads_no_rich_and_errors_stay_one_line(tmp_path: Path) -> None:
    """``--json`` prints a document for programs: rich, which draws for people, stays unloaded.

    An error under ``--json`` is still its one line on stderr, as without it.
    """
    repo, area = tmp_path / "repo", tmp_path / "area"
    make_area(area)
    for args in (["init", str(repo)], ["--repo", str(repo), "commit", str(area)]):
        assert runner.invoke(root.app, args).exit_code == 0
    edit(area / "disk.img", 4096, b"changed")
    for args in (
        ["log", "--json"],
        ["show", "E1", "--json"],
        ["status", str(area), "--json"],
        ["commit", str(area), "--json"],
    ):
        code, stdout, stderr, modules = _run_main_err(["--repo", str(repo), *args])
        assert (code, stderr) == (0, ""), args
        assert json.loads(stdout), args
        assert sorted(m for m in modules if m.partition(".")[0] == "rich") == [], args
    code, stdout, stderr, _modules = _run_main_err(["--repo", str(repo), "show", "E9", "--json"])
    plain = runner.invoke(root.app, ["--repo", str(repo), "show", "E9"])
    assert (code, stdout) == (plain.exit_code, "") != (0, "")
    assert (
        stderr
        == plain.stderr
        == "vml: no entry named 'E9'; run `vml log --all` to list the entries\n"
    )


def test_lines_for_a_file_or_pipe_load_no_rich_and_are_riches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save's summary, its error, ``status``, ``log``, ``checkout`` to a pipe: no rich at all.

    rich costs ~40 ms of every start; off a terminal what it would print is
    plain text.  The same commands drawn by rich itself (``plain_line``
    refusing every line) print the same characters.
    """
    repo, area = tmp_path / "repo", tmp_path / "area"
    make_area(area)
    for args in (["init", str(repo)], ["--repo", str(repo), "commit", str(area), "-m", "[b]x\\"]):
        assert runner.invoke(root.app, args).exit_code == 0
    edit(area / "disk.img", 4096, b"changed")
    code, stdout, stderr, modules = _run_main_err(["--repo", str(repo), "commit", str(area)])
    assert (code, stdout.splitlines()[0], stderr) == (0, "E2", ""), stderr
    assert stdout.splitlines()[1].startswith("incremental entry E2 (parent E1): read ")
    runs = (
        ["commit", str(area)],  # nothing changed: an error, on stderr
        ["status", str(area)],
        ["log"],
        ["log", "--graph"],
        ["show", "E1"],
        ["checkout", "E1", str(tmp_path / "out")],
    )
    from vml.cli import render

    monkeypatch.setattr(render, "plain_line", lambda *_: None)  # in this process only
    for args in runs:
        code, stdout, stderr, modules = _run_main_err(["--repo", str(repo), *args])
        assert stdout + stderr, args
        assert sorted(m for m in modules if m.partition(".")[0] == "rich") == [], args
        if args[0] != "checkout":  # (it would check out twice)
            drawn = runner.invoke(root.app, ["--repo", str(repo), *args])
            assert (drawn.exit_code, drawn.stdout, drawn.stderr) == (code, stdout, stderr), args
    assert "rich.console" in sys.modules


#: QEMU's dirty-bitmap code: a save of a VM of another hypervisor has no use for it.
QEMU_BITMAPS = ("vml.plumbing.dirty", "vml.plumbing.vm.bitmaps", "vml.plumbing.vm.qcow2")


def test_a_save_of_a_vm_that_is_not_qemu_loads_no_bitmap_code(tmp_path: Path) -> None:
    """A VMware area's save (and one that finds nothing changed) never reads a bitmap: no import.

    The same area described for QEMU (``vm init``) loads it: the test sees the difference.
    """
    repo, area = tmp_path / "repo", tmp_path / "area"
    make_area(area)
    for args in (["init", str(repo)], ["--repo", str(repo), "commit", str(area)]):
        assert runner.invoke(root.app, args).exit_code == 0
    edit(area / "disk.img", 4096, b"changed")
    for expected in (0, NothingToCommit.exit_code):
        code, _out, stderr, modules = _run_main_err(["--repo", str(repo), "commit", str(area)])
        assert code == expected, stderr
        assert [m for m in QEMU_BITMAPS if m in modules] == []
    (area / "vm.vmx").unlink()
    vm_init = ["vm", "init", str(area), "--disk", str(area / "disk.img"), "--network", "none"]
    assert runner.invoke(root.app, vm_init).exit_code == 0
    code, _out, stderr, modules = _run_main_err(["--repo", str(repo), "commit", str(area)])
    assert code == 0, stderr
    assert [m for m in QEMU_BITMAPS if m in modules] == list(QEMU_BITMAPS)


def test_a_quiet_checkout_or_restore_loads_no_rich(tmp_path: Path) -> None:
    """``checkout -q`` and ``restore -q`` print nothing: rich, which formats lines, stays unloaded.

    The files are written by then; loading rich's markup code to format a
    line nobody sees would only make the command end later.
    """
    repo, area = tmp_path / "repo", tmp_path / "area"
    make_area(area)
    for args in (["init", str(repo)], ["--repo", str(repo), "commit", str(area)]):
        assert runner.invoke(root.app, args).exit_code == 0
    for args in (
        ["checkout", "E1", str(tmp_path / "copy"), "-q"],
        ["restore", "E1", str(area), "-q"],
    ):
        code, stdout, stderr, modules = _run_main_err(["--repo", str(repo), *args])
        assert (code, stdout, stderr) == (0, "", ""), args
        assert sorted(m for m in modules if m.partition(".")[0] == "rich") == [], args
    assert (tmp_path / "copy" / "disk.img").read_bytes() == (area / "disk.img").read_bytes()


#: What configuring remotes must not load: clone, fetch, their checks, entries and packs.
NOT_FOR_REMOTES = (
    "vml.porcelain.clone",
    "vml.porcelain.fetch",
    "vml.plumbing.verify",
    "vml.plumbing.arrivals",
    "vml.plumbing.chains",
    "vml.plumbing.packreader",
    "dulwich.client",
)


def test_remote_add_list_remove_load_only_the_remotes_configuration(tmp_path: Path) -> None:
    repo, other = tmp_path / "repo", tmp_path / "other"
    for args in (["init", str(repo)], ["init", str(other)]):
        assert runner.invoke(root.app, args).exit_code == 0
    runs = (
        (["remote", "add", "origin", str(other)], f"remote origin -> {other}"),
        (["remote", "list"], f"origin  {other}"),
        (["remote", "remove", "origin"], "removed remote origin"),
        (["remote", "list"], "no remotes"),
    )
    for args, said in runs:
        code, stdout, modules = _run_main(["--repo", str(repo), *args])
        assert code == 0 and said in stdout, (args, stdout)
        assert "vml.porcelain.remote" in modules
        assert [m for m in NOT_FOR_REMOTES if m in modules] == [], args


def _python_m_vml(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "vml", *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_a_command_that_succeeds_leaves_its_whole_output_and_code_zero(tmp_path: Path) -> None:
    """``python -m vml`` ends with os._exit after a success: nothing it printed may be lost."""
    area = tmp_path / "area"
    make_area(area)
    repo = tmp_path / "repo"
    assert _python_m_vml(["--repo", str(repo), "init"], tmp_path).returncode == 0
    done = _python_m_vml(["--repo", str(repo), "commit", str(area), "-m", "one"], tmp_path)
    assert (done.returncode, done.stdout.splitlines()[0]) == (0, "E1"), done.stderr
    listed = _python_m_vml(["--repo", str(repo), "log"], tmp_path)
    whole = runner.invoke(root.app, ["--repo", str(repo), "log"])
    assert (listed.returncode, listed.stdout) == (0, whole.stdout)
    assert subprocess.run(["git", "-C", str(repo), "fsck", "--full", "--strict"]).returncode == 0


def _run_then_teardown(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``app.run`` on ``args``, in a process whose teardown would print ``TEARDOWN``."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TEARDOWN', file=sys.stderr))\n"
        "from vml.cli.app import run\n"
        "sys.argv = ['vml', *sys.argv[1:]]\n"
        "run()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_a_command_that_fails_leaves_at_once_with_its_code_and_its_line(tmp_path: Path) -> None:
    """A VML error or a usage error is its line and its code; the teardown is skipped too."""
    area, repo = tmp_path / "area", tmp_path / "repo"
    make_area(area)
    for args in (["init", str(repo)], ["--repo", str(repo), "commit", str(area)]):
        assert runner.invoke(root.app, args).exit_code == 0
    runs = (
        ["--repo", str(tmp_path / "none"), "log"],
        ["--repo", str(repo), "commit", str(area)],  # nothing changed
        ["--repo", str(repo), "log", "--no-such-option"],
    )
    for args in runs:
        done = _run_then_teardown(args, tmp_path)
        whole = runner.invoke(root.app, args)
        assert (done.returncode, done.stdout, done.stderr) == (
            whole.exit_code,
            "",
            whole.stderr,
        ), args
        assert done.returncode != 0 and done.stderr.startswith("vml: "), args
    done = _run_then_teardown(["--repo", str(repo), "log"], tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_an_exception_that_escapes_takes_the_ordinary_way_out() -> None:
    """A traceback is no handled error: the interpreter's exit runs (here, its handlers)."""
    sabotaged = subprocess.run(
        [
            sys.executable,
            "-c",
            "import atexit, sys\n"
            "atexit.register(lambda: print('TEARDOWN', file=sys.stderr))\n"
            "from vml.cli import app\n"
            "def boom(): raise RuntimeError('boom')\n"
            "app.main = boom\n"
            "app.run()\n",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert sabotaged.returncode == 1
    assert "RuntimeError: boom" in sabotaged.stderr and "TEARDOWN" in sabotaged.stderr


def test_the_quick_exit_waits_for_the_ordinary_one_while_another_thread_runs() -> None:
    """With a thread still running, ``_exit_now`` returns (the interpreter's exit joins it)."""
    from vml.cli import app

    release = threading.Event()
    t = threading.Thread(target=release.wait)
    t.start()
    try:
        app._exit_now(0)  # would end this test process at once if it did not return
    finally:
        release.set()
        t.join()


def test_a_bar_is_drawn_only_for_a_command_that_lasts(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the bar (and rich's import) waits ``BAR_AFTER``: a short command draws none."""
    from vml.cli import render

    monkeypatch.setattr(render, "bars_wanted", lambda: True)
    drawn: list[str] = []
    real = render._draw_bar

    def draw(what: str) -> object:
        drawn.append(what)
        return real(what)

    monkeypatch.setattr(render, "_draw_bar", draw)
    monkeypatch.setattr(render, "BAR_AFTER", 3600.0)
    with render.progress_bar("saving") as progress:
        progress("disk.img", 1 << 20, 4 << 20)
        progress("disk.img", 4 << 20, 4 << 20)
    assert drawn == []
    monkeypatch.setattr(render, "BAR_AFTER", 0.0)
    with render.progress_bar("saving") as progress:
        progress("disk.img", 1 << 20, 4 << 20)
        progress("disk.img", 4 << 20, 4 << 20)
        bars = threading.Thread(target=progress, args=("ram", 1, 2))
        bars.start()
        bars.join()
    assert drawn == ["saving"]
    for t in threading.enumerate():  # the bar was stopped: its refresh thread ends
        if type(t).__name__ == "_RefreshThread":
            t.join(timeout=5)
            assert not t.is_alive()
