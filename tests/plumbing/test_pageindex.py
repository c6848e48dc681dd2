"""The page index: candidate pages read in runs of adjacent pages, sources worth a read."""

from __future__ import annotations

import os
from pathlib import Path

from vml.plumbing.packreader import PackReader
from vml.plumbing.pageindex import (
    MAX_DELTA_SOURCES,
    MIN_SOURCE_PAGES,
    RUN_PAGES,
    PageIndex,
    _limit,
)
from vml.plumbing.repository import Repository

PAGE = 4096


def test_candidate_pages_are_read_in_runs_of_adjacent_pages(
    tmp_path: Path, repo: Repository
) -> None:
    """Sorted offsets (a page asked twice, adjacent pages, a run longer than RUN_PAGES)
    come back as runs: each holds the file's bytes and covers exactly its offsets."""
    data = os.urandom(PAGE * (RUN_PAGES + 200))
    src = tmp_path / "disk.img"
    src.write_bytes(data)
    pages = [0, 1, 2, 2, 3, 10, 11, 50, *range(100, 100 + RUN_PAGES + 5)]
    offsets = [p * PAGE for p in pages]
    index = PageIndex(PackReader(repo), PAGE, 16 * PAGE)
    try:
        runs = index._pread_runs(src, offsets)
    finally:
        index.close()
    # {0..3}, {10, 11}, {50}, then RUN_PAGES pages from 100 and the 5 after them.
    assert [(start // PAGE, len(buf) // PAGE) for start, buf, _, _ in runs] == [
        (0, 4),
        (10, 2),
        (50, 1),
        (100, RUN_PAGES),
        (100 + RUN_PAGES, 5),
    ]
    assert [i for _, _, i, _ in runs] == [0, *(j for _, _, _, j in runs[:-1])]
    assert runs[-1][3] == len(offsets)
    for start, buf, i, j in runs:
        assert buf == data[start : start + len(buf)]
        assert all(start <= off < start + len(buf) for off in offsets[i:j])


def test_references_keep_only_sources_worth_a_read() -> None:
    """A delta names at most MAX_DELTA_SOURCES sources, each giving MIN_SOURCE_PAGES."""
    few = {k: (b"a" * 20, k * PAGE) for k in range(MIN_SOURCE_PAGES)}
    assert _limit(few) == few
    lone = {100: (b"b" * 20, 0)}  # one page from a source: not worth reading it
    assert _limit({**few, **lone}) == few
    many = {}
    k = 0
    for s in range(MAX_DELTA_SOURCES + 2):
        for _ in range(MIN_SOURCE_PAGES + s):  # source s gives MIN_SOURCE_PAGES + s pages
            many[k] = (bytes([s]) * 20, k * PAGE)
            k += 1
    kept = _limit(many)
    assert {src for src, _ in kept.values()} == {
        bytes([s]) * 20 for s in range(2, MAX_DELTA_SOURCES + 2)
    }
    assert all(many[k] == w for k, w in kept.items())
