"""A raw disk's kept dirty ranges read back exactly as written, and a damaged file is never used."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vml.plumbing.vm import bitmaps
from vml.plumbing.vm.ignore import VML_DIR
from vml.plumbing.vm.qcow2 import merge_ranges

REC = bitmaps.Record("vml-0123456789abcdef", "ab" * 20, 1234, 1 << 46, False)

ranges = st.lists(
    st.tuples(st.integers(0, (1 << 46) - 1), st.integers(1, 1 << 30)).map(
        lambda t: (t[0], min(t[0] + t[1], 1 << 46))
    ),
    max_size=50,
).map(merge_ranges)


@settings(max_examples=60, deadline=None)
@given(ranges)
def test_kept_ranges_read_back_as_written(
    tmp_path_factory: pytest.TempPathFactory, got: list[tuple[int, int]]
) -> None:
    area = tmp_path_factory.mktemp("area")
    (area / VML_DIR).mkdir()
    name = bitmaps.write_kept(area, REC, got)
    assert bitmaps.read_kept(area, REC, name) == got


@settings(max_examples=60, deadline=None)
@given(ranges, st.data())
def test_a_damaged_kept_file_is_refused(
    tmp_path_factory: pytest.TempPathFactory, got: list[tuple[int, int]], data: st.DataObject
) -> None:
    area = tmp_path_factory.mktemp("area")
    (area / VML_DIR).mkdir()
    name = bitmaps.write_kept(area, REC, got)
    path = area / VML_DIR / name
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "cut"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    path.write_bytes(bytes(raw))
    with pytest.raises(bitmaps.KeptUnusable):
        bitmaps.read_kept(area, REC, name)


def test_kept_files_go_with_their_records(tmp_path: Path) -> None:
    area = tmp_path
    (area / VML_DIR).mkdir()
    kept = bitmaps.write_kept(area, REC, [(0, 65536)])
    other = bitmaps.write_kept(area, bitmaps.Record("vml-ffff", "cd" * 20, 1, 2, False), [])
    bitmaps.save_records(area, {"disk.img": bitmaps.Record(**{**REC.__dict__, "kept": kept})})
    assert sorted(p.name for p in (area / VML_DIR).glob("dirty-*")) == [kept]
    assert bitmaps.load_records(area)["disk.img"].kept == kept
    assert other != kept
    bitmaps.drop_records(area)
    assert list((area / VML_DIR).glob("dirty-*")) == []


def test_records_without_kept_ranges_read_as_older_vml_wrote_them(tmp_path: Path) -> None:
    (tmp_path / VML_DIR).mkdir()
    older = '{"vml_bitmaps": 1, "disks": {"d.img": {"name": "vml-1", "since": "ab", "inode": 1, "size": 2, "persistent": false}}}'
    (tmp_path / VML_DIR / bitmaps.RECORDS).write_text(older)
    rec = bitmaps.load_records(tmp_path)["d.img"]
    assert rec.kept is None and rec.carried is None
    bitmaps.save_records(tmp_path, {"d.img": rec})  # written back as it was
    assert (tmp_path / VML_DIR / bitmaps.RECORDS).read_text().strip() == older
