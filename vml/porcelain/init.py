"""``vml init``: create a repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vml.plumbing.repository import DEFAULT_BLOCK_SIZE, init_repository
from vml.records import Record


@dataclass
class InitResult(Record):
    """The new repository."""

    path: str
    block_size: int


def init(path: Path, block_size: int = DEFAULT_BLOCK_SIZE) -> InitResult:
    """Create an empty repository at ``path``."""
    repo = init_repository(path, block_size)
    try:
        return InitResult(str(repo.path), repo.block_size)
    finally:
        repo.close()
