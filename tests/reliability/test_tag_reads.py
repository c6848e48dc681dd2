"""Reading the refs costs an object read only for a tag that needs peeling.

Every command reads the refs, and every tag was peeled by reading its
target: a repository with thousands of tags paid a loose-object read per
tag (VML's own tags included) on every `vml log` or `vml status` (2,000
tags: ~0.2-0.5 s of each).  Now a tag that names what an entry ref names
is that entry without a read, an annotated one costs the read of its tag
object, and a packed one git's peeled line.  Counted with strace on a real
process: opens of object files, whatever the number of lightweight tags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.compat.test_git_tags import _git, tagged
from tests.conftest import need
from tests.reliability.helpers import ROOT
from vml.plumbing import refs as refs_mod

_READ = """
import sys
from pathlib import Path
from vml.plumbing.refs import read_refs
from vml.plumbing.repository import open_repository
repo = open_repository(Path(sys.argv[1]))
table = read_refs(repo)
print(len(table.tags), len({c for c in table.tags.values()}))
"""


def _object_opens(repo: Path) -> tuple[str, int]:
    """What reading the refs printed, and how many object files it opened."""
    need("strace")
    log = repo.parent / "strace.log"
    run = subprocess.run(
        ["strace", "-f", "-o", str(log), "-e", "trace=open,openat",
         sys.executable, "-c", _READ, str(repo)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    objects = f"{repo.resolve()}/objects/"
    opens = [
        ln
        for ln in log.read_text().splitlines()
        if objects in ln and "/pack/" not in ln and "= -1" not in ln and "O_DIRECTORY" not in ln
    ]
    return run.stdout.strip(), len(opens)


def test_lightweight_tags_cost_no_object_read_and_annotated_ones_one_each(
    tmp_path: Path,
) -> None:
    repo, e2 = tagged(tmp_path, "tag-of-tag")  # git's `t` and `inner`, both loose
    path = repo.path
    stdin = "".join(f"create refs/tags/lw{i} {e2.hex()}\n" for i in range(300))
    subprocess.run(["git", "--git-dir", str(path), "update-ref", "--stdin"], input=stdin,
                   text=True, check=True)  # fmt: skip
    for i in range(5):
        _git(path, "tag", "-a", f"an{i}", "-m", "annotated", e2.hex())
    said, opens = _object_opens(path)
    assert said == "307 1", said  # every tag names E2
    # t (then inner), inner, an0..an4: one tag object each; no commit read at all
    assert opens <= 8, opens
    table = refs_mod.read_refs(repo)
    assert set(table.tags.values()) == {e2}
    # Packed, git's peeled lines answer: no object read.
    _git(path, "pack-refs", "--all")
    said, opens = _object_opens(path)
    assert said == "307 1" and opens == 0, (said, opens)
