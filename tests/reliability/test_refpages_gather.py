"""Reference pages gathered by the pool's workers are the pages a lone reader gathers (#12)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.reliability.helpers import vml_in_process as vml
from tests.reliability.test_page_references import PAGE, _area, _session
from vml.plumbing import refpages as refpages_mod
from vml.plumbing import refs as refs_mod
from vml.plumbing.chains import resolve_image
from vml.plumbing.packreader import PackReader
from vml.plumbing.refpages import RefPages
from vml.plumbing.repository import open_repository


@pytest.mark.parametrize("memory", [0, 3 * PAGE + 100, 1 << 30])
def test_pages_gathered_in_the_pool_match_the_ones_read_in_order(
    tmp_path: Path, cli_repo: Path, memory: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    area, rng = _area(tmp_path)
    for _ in range(3):
        assert vml(cli_repo, "commit", "-q", area).code == 0
        _session(area, rng)
    # A small window ahead: several sources in flight, the order kept.
    monkeypatch.setattr(refpages_mod, "_AHEAD", 2 * PAGE)
    repo = open_repository(cli_repo)
    reader = PackReader(repo)
    pool = ThreadPoolExecutor(3)
    try:
        commit = refs_mod.resolve_name(repo, "E3", refs_mod.read_refs(repo))
        image = resolve_image(reader, commit, "vm.ram")
        assert image is not None
        alone = RefPages(reader, image, verify=True, memory=memory)
        pooled = RefPages(reader, image, verify=True, memory=memory, pool=pool)
        assert alone._slots and alone._slots.keys() == pooled._slots.keys()
        assert pooled.read_bytes == alone.read_bytes
        probes = 0
        for src, (_first, offsets, _size) in alone._slots.items():
            for off in offsets:
                for length in (PAGE, 17):
                    got = pooled.read(src, off, length)
                    assert got == alone.read(src, off, length)
                    assert got == reader.read(src)[1][off : off + length]
                    probes += 1
        assert probes > 4
        # Runs of adjacent pages (a run of reference pages) in one read, across
        # the memory budget's end too.
        runs = 0
        for src, (_first, offsets, _size) in alone._slots.items():
            data = reader.read(src)[1]
            for j, off in enumerate(offsets):
                for k in (2, 3, 5):
                    if list(offsets[j : j + k]) == [off + i * PAGE for i in range(k)]:
                        want = data[off : off + k * PAGE - 9]
                        assert pooled.read(src, off, k * PAGE - 9) == want
                        assert alone.read(src, off, k * PAGE - 9) == want
                        runs += 1
        assert runs > 4
        alone.close()
        pooled.close()
    finally:
        pool.shutdown()
        reader.close()
        repo.close()
