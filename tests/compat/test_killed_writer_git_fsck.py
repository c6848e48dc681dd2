"""A writer killed at any point of sealing a pack leaves a repository `git fsck` accepts.

Its temporary index was named `tmp_vml_<pid>_….idx`: git reads every `*.idx`
of the pack folder as an index, and one cut short by a kill made `git fsck
--full` fail ("index file … is too small") until a `vml gc` (found by the
crash stress).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need

_KILLED = """
import os, sys
from pathlib import Path
from vml.plumbing import packwriter
from vml.plumbing.repository import open_repository
step = sys.argv[2]
real_replace, real_index = os.replace, packwriter.write_pack_index_v2
def half_index(f, entries, checksum):
    f.write(b"\\377tOc" + bytes(60))  # the index cut short
    f.flush()
    os._exit(9)
calls = []
def dying(a, b):
    # The seal's renames: the .keep's claim, the pack, the index.
    calls.append(b)
    if len(calls) == int(step[-1]):
        os._exit(9)  # killed before this rename: nothing cleans up
    real_replace(a, b)
if step == "index":
    packwriter.write_pack_index_v2 = half_index
else:
    packwriter.os.replace = dying
w = packwriter.PackWriter(open_repository(Path(sys.argv[1])))
w.add_blob(b"an object" * 1000)
w.finish()
os._exit(9)  # killed before its refs moved and its claim was dropped
"""


# Writing the index; before its claim is in the .keep, before the pack's
# rename, before the index's; sealed, but before its refs moved.
@pytest.mark.parametrize("step", ["index", "rename1", "rename2", "rename3", "rename9"])
def test_a_writer_killed_while_sealing_leaves_git_fsck_clean(tmp_path: Path, step: str) -> None:
    need("git")
    repo = tmp_path / "repo"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-m", "vml", "init", "-q", str(repo)], check=True, env=env)
    run = subprocess.run(
        [sys.executable, "-c", _KILLED, str(repo), step], env=env, capture_output=True
    )
    assert run.returncode == 9, run.stderr
    pack_dir = repo / "objects" / "pack"
    left = sorted(p.name for p in pack_dir.iterdir())
    assert left, left  # the kill left its files (temporaries, a claim, a pack)
    fsck = subprocess.run(
        ["git", "-C", str(repo), "fsck", "--full", "--strict"], capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stderr
    assert "error" not in fsck.stderr, fsck.stderr
    # One vml gc clears it all: the dead claim protects nothing.
    subprocess.run([sys.executable, "-m", "vml", "-R", str(repo), "gc", "-q"], check=True, env=env)
    assert not list(pack_dir.iterdir()), sorted(p.name for p in pack_dir.iterdir())
