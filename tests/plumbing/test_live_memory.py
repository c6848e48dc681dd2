"""The blocks of a memory file that changed, found a window at a time.

A live save hashes the guest's memory file in the pause and copies the
blocks whose xxh3 differs from the area's entry.  It maps the file a window
at a time: the answer must be the same as hashing every block of the file
whole, whatever the window, the block size, holes or the file's end, and
VML's resident set must not grow with the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vml.plumbing.vm import live

KiB = 1024


def _expected(data: bytes, bs: int, old: dict[int, bytes]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in range(-(-len(data) // bs)):
        a, b = n * bs, min((n + 1) * bs, len(data))
        if xxhash.xxh3_128_digest(data[a:b]) != old.get(n):
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    blocks=st.lists(st.sampled_from(["data", "hole", "zero"]), min_size=0, max_size=24),
    tail=st.integers(0, 4 * KiB - 1),
    window_blocks=st.integers(1, 5),
    changed=st.sets(st.integers(0, 24)),
    bs=st.sampled_from([4 * KiB, 16 * KiB]),
)
def test_changed_blocks_match_hashing_the_whole_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    blocks: list[str],
    tail: int,
    window_blocks: int,
    changed: set[int],
    bs: int,
) -> None:
    monkeypatch.setattr(live, "HASH_WINDOW", window_blocks * bs)
    path = tmp_path / "vm.ram"
    size = len(blocks) * bs + (tail if blocks else 0)
    with open(path, "wb") as f:
        f.truncate(size)
        for n, kind in enumerate(blocks):
            if kind != "hole":
                f.seek(n * bs)
                f.write(bytes(bs) if kind == "zero" else bytes([n + 1]) * bs)
    data = path.read_bytes()
    # The entry held the same bytes, except in the blocks ``changed`` names.
    old = {
        n: xxhash.xxh3_128_digest(data[n * bs : (n + 1) * bs] + (b"x" if n in changed else b""))
        for n in range(-(-size // bs))
    }
    ref = live.Reference(block_size=bs, size=size, hashes=old.get)
    assert live._changed_blocks(path, ref) == _expected(data, bs, old)


def test_hashing_a_memory_file_keeps_the_resident_set_flat(tmp_path: Path) -> None:
    """256 MiB of memory file, hashed: VML's peak RSS grows by about a window, not 256 MiB."""
    path = tmp_path / "vm.ram"
    size = 256 << 20
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    probe = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from vml.plumbing.vm import live\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "ref = live.Reference(block_size=1 << 20, size={size}, hashes=lambda n: None)\n"
        "assert len(live._changed_blocks(Path(sys.argv[1]), ref)) == 1\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe.replace("{size}", str(size)), str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    grown_kib = int(run.stdout)
    assert grown_kib < 48 * 1024, f"peak RSS grew {grown_kib} KiB hashing 256 MiB"
