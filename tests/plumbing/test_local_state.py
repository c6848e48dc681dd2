"""Local, non-replicated state: the area list, area.json, the cache index, the config."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from vml.errors import AreaError, RepositoryNotFound
from vml.plumbing.areas import load_state, vml_dir
from vml.plumbing.cache import Cache
from vml.plumbing.repository import Repository, open_repository


def test_areas_registered_at_once_are_all_kept(repo: Repository, tmp_path: Path) -> None:
    areas = [tmp_path / f"area{i}" for i in range(16)]
    for a in areas:
        a.mkdir()
    threads = [threading.Thread(target=repo.register_area, args=(a,)) for a in areas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(repo.known_areas()) == sorted(str(a.resolve()) for a in areas)


@pytest.mark.parametrize(
    "doc",
    [[], {"entry": "zz"}, {"pending": 5}, {"entry": "ab" * 20, "branch": 3}, "text"],
    ids=["list", "bad-entry", "bad-pending", "bad-branch", "string"],
)
def test_a_malformed_area_json_is_one_clear_error(tmp_path: Path, doc: object) -> None:
    vml_dir(tmp_path).mkdir()
    (vml_dir(tmp_path) / "area.json").write_text(json.dumps(doc))
    with pytest.raises(AreaError, match="malformed"):
        load_state(tmp_path)


def test_a_malformed_cache_index_is_ignored(tmp_path: Path) -> None:
    (vml_dir(tmp_path) / "cache").mkdir(parents=True)
    (vml_dir(tmp_path) / "cache" / "index.json").write_text("[]")
    cache = Cache(tmp_path, 4096, 1 << 20)
    assert cache.entry is None and cache.files == {}


@pytest.mark.parametrize("value", ["abc", "1000", "0", "3145728"])
def test_an_impossible_block_size_in_the_config_is_refused(repo: Repository, value: str) -> None:
    cfg = repo.git.get_config()
    cfg.set((b"vml",), b"blockSize", value.encode())
    cfg.write_to_path()
    with pytest.raises(RepositoryNotFound, match=r"blockSize|block size"):
        open_repository(repo.path)
