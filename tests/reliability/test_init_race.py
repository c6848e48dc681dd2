"""Two `vml init` of one empty folder at once: one makes the repository, the other changes nothing.

Each claims the folder before it writes anything in it (it creates `vml/`
there, which only one process can); the one that loses the claim refuses
and removes nothing, and a failing one removes only what it made after its
claim.  Raced for real: two processes released at one instant, round after
round.  Before the claim, about one round in fifteen ended with both
failing and no repository: the loser's undo removed the winner's files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.reliability.helpers import ROOT
from vml.plumbing.repository import is_repository, open_repository

ROUNDS = 120

_RACER = """
import sys
from pathlib import Path
from vml.errors import VMLError
from vml.plumbing.repository import init_repository
base, me = Path(sys.argv[1]), sys.argv[2]
for n in range(int(sys.argv[3])):
    go = base / f"go{n}"
    while not go.exists():
        pass
    try:
        init_repository(base / f"repo{n}").close()
        said = "made"
    except VMLError as e:
        said = "refused " + e.message
    except Exception as e:
        said = f"failed {e!r}"
    (base / f"tmp{n}.{me}").write_text(said)
    (base / f"tmp{n}.{me}").rename(base / f"said{n}.{me}")
"""


def test_two_inits_of_one_folder_never_undo_each_other(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for n in range(ROUNDS):
        if n % 2:
            (tmp_path / f"repo{n}").mkdir()  # an empty folder given, or a new one made
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), me, str(ROUNDS)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in "ab"
    ]
    try:
        for n in range(ROUNDS):
            (tmp_path / f"go{n}").touch()
            said = [tmp_path / f"said{n}.{me}" for me in "ab"]
            deadline = time.monotonic() + 60
            while not all(p.exists() for p in said):
                for r, mine in zip(racers, said, strict=True):
                    # A racer leaves after its last round: polled first, so
                    # an exit seen here happened after its answer was written.
                    if r.poll() is not None:
                        assert mine.exists(), r.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.001)
            words = sorted(p.read_text() for p in said)
            target = tmp_path / f"repo{n}"
            # One made it; the other refused in one clear line; the repository is whole.
            assert words[0] == "made" and words[1].startswith("refused "), (n, words)
            assert is_repository(target), (n, words)
            open_repository(target).close()
    finally:
        for r in racers:
            r.kill()
            r.wait()
