"""Fixtures of the reliability tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.helpers import vml_in_process as vml


@pytest.fixture
def cli_repo(tmp_path: Path) -> Path:
    """A repository (64 KiB blocks) made by the CLI."""
    r = tmp_path / "repo"
    assert vml(r, "init", "--block-size", "64K", r).code == 0
    return r
