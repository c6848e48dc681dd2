"""Fixtures of the reliability tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import make_area
from tests.reliability.helpers import vml_in_process as vml

World = tuple[Path, Path, Path, Path]  # repo, area of E1, area of E2, E2's pack


@pytest.fixture
def cli_repo(tmp_path: Path) -> Path:
    """A repository (64 KiB blocks) made by the CLI."""
    r = tmp_path / "repo"
    assert vml(r, "init", "--block-size", "64K", r).code == 0
    return r


@pytest.fixture
def world(tmp_path: Path, cli_repo: Path) -> World:
    """E1 and E2 saved from two areas, so that E2's objects sit in a pack of their own."""
    a1, a2 = tmp_path / "one", tmp_path / "two"
    make_area(a1, seed=1)
    make_area(a2, seed=2)
    (a2 / "vm.nvram").write_bytes(os.urandom(100 << 10))  # an image of its own
    packs = cli_repo / "objects" / "pack"
    assert vml(cli_repo, "commit", "-q", a1).code == 0
    before = set(packs.glob("*.pack"))
    assert vml(cli_repo, "commit", "-q", a2).code == 0
    (pack2,) = set(packs.glob("*.pack")) - before
    return cli_repo, a1, a2, pack2
