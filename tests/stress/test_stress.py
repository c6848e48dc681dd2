"""The short crash stress run CI does: ~20 trials of SIGKILL at random moments.

The full run (>= 200 trials) is by hand: ``python3 tests/stress/run.py --trials 200``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.stress.run import StressFailure, run

TRIALS = int(os.environ.get("VML_STRESS_TRIALS", "20"))


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    try:
        stats = run(TRIALS, 20240501, tmp_path / "w", full_every=10, only=None, out=lines.append)
    except StressFailure as e:
        raise AssertionError("\n".join([*lines, f"FAILED: {e}"])) from None
    assert stats["trials"] == TRIALS, lines
    assert stats["killed"] > 0, lines
