"""Geometric roll-up: whatever the pack sizes, what is left is a progression."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from vml.plumbing.repack import FACTOR, rollup


@given(st.lists(st.integers(min_value=1, max_value=1 << 40), max_size=60))
def test_rollup_leaves_a_geometric_progression(sizes: list[int]) -> None:
    sizes = sorted(sizes)
    k = rollup(sizes)
    assert k == 0 or 2 <= k <= len(sizes)
    after = ([sum(sizes[:k])] if k else []) + sizes[k:]
    after.sort()
    # Each pack is at least FACTOR times the one below it: few packs, and
    # a consolidation of what is already rolled up has nothing to do.
    assert all(b >= FACTOR * a for a, b in itertools.pairwise(after))
    assert rollup(after) == 0
