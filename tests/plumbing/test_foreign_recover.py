"""Merging back after a save through QMP, when QEMU answers oddly or a merge was left running.

A real QEMU runs these paths in tests/guest and tests/cli/test_foreign_saves.py;
a QEMU cannot be made to fail a ``query-block`` or keep a merge job from a
killed saver on demand, so a scripted QMP peer does here: an overlay is
deleted only when QEMU surely no longer uses it (it holds the guest's
writes since the pause), and a merge a killed save left is finished before
anything else is merged.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vml.errors import VMControlError
from vml.plumbing.vm import foreign
from vml.plumbing.vm.qmp import QMPClient

Answer = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Path, list[str], dict[str, Answer]]]:
    """A QMP peer answering each command with ``answers[name](msg)``; records commands."""
    path = tmp_path / "qmp.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    seen: list[str] = []
    answers: dict[str, Answer] = {"qmp_capabilities": lambda m: {"return": {}}}

    def run() -> None:
        conn, _ = srv.accept()
        f = conn.makefile("rwb", buffering=0)
        f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        for line in f:
            msg = json.loads(line)
            seen.append(msg["execute"])
            reply = answers[msg["execute"]](msg)
            f.write(json.dumps({**reply, "id": msg.get("id")}).encode() + b"\n")
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield path, seen, answers
    srv.close()


def test_an_overlay_is_kept_when_qemu_does_not_say_it_is_unused(
    tmp_path: Path, peer: tuple[Path, list[str], dict[str, Answer]]
) -> None:
    path, _, answers = peer
    answers["query-block"] = lambda m: {"error": {"class": "GenericError", "desc": "busy"}}
    overlay = tmp_path / "area" / ".vml" / "overlays" / "disk.qcow2"
    overlay.parent.mkdir(parents=True)
    overlay.write_bytes(b"the guest's writes since the pause")
    disk = foreign._Disk("disk.qcow2", "node0", overlay)
    with QMPClient.connect(path) as c, pytest.raises(VMControlError, match="did not say"):
        foreign._merge_back(c, tmp_path / "area", [disk])
    assert overlay.exists()


def test_a_merge_a_killed_save_left_is_finished_first(
    tmp_path: Path, peer: tuple[Path, list[str], dict[str, Answer]]
) -> None:
    path, seen, answers = peer
    jobs = [{"device": "vml-merge-0", "ready": True}, {"device": "theirs", "ready": True}]
    answers["query-block-jobs"] = lambda m: {"return": list(jobs)}

    def complete(m: dict[str, Any]) -> dict[str, Any]:
        assert m["arguments"]["device"] == "vml-merge-0"  # never someone else's job
        jobs.pop(0)
        return {"return": {}}

    answers["block-job-complete"] = complete
    answers["query-block"] = lambda m: {"return": []}
    with QMPClient.connect(path) as c:
        foreign.recover(c, tmp_path / "area")
    assert seen.count("block-job-complete") == 1
    assert seen.index("block-job-complete") < seen.index("query-block")


def test_capabilities_are_put_back_once_a_cancelled_migration_ended(
    peer: tuple[Path, list[str], dict[str, Answer]],
) -> None:
    path, seen, answers = peer
    status = ["cancelling", "cancelling", "cancelled"]
    answers["query-migrate-parameters"] = lambda m: {"return": {"max-bandwidth": 1000}}
    answers["query-migrate-capabilities"] = lambda m: {"return": []}
    answers["migrate-set-parameters"] = lambda m: {"return": {}}
    answers["query-migrate"] = lambda m: {
        "return": {"status": status.pop(0) if status else "cancelled"}
    }

    def caps(m: dict[str, Any]) -> dict[str, Any]:
        if 0 < len(status) < 3:  # QEMU refuses while the migration is still cancelling
            return {
                "error": {
                    "class": "GenericError",
                    "desc": "There's a migration process in progress",
                }
            }
        return {"return": {}}

    answers["migrate-set-capabilities"] = caps
    with QMPClient.connect(path) as c, foreign._migration_settings(c):
        pass
    # Set on entry, and put back (pause-before-switchover off) only after "cancelled".
    assert seen.count("migrate-set-capabilities") == 2
    assert seen[-1] == "migrate-set-capabilities" and seen[-2] == "migrate-set-parameters"
    assert seen.count("query-migrate") == 3


def test_an_overlay_that_cannot_be_deleted_does_not_stop_the_others(
    tmp_path: Path, peer: tuple[Path, list[str], dict[str, Answer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, answers = peer
    answers["query-block"] = lambda m: {"return": []}  # QEMU runs on none of them any more
    area = tmp_path / "area"
    stuck = area / ".vml" / "overlays" / "a.qcow2"
    other = area / ".vml" / "overlays" / "b.qcow2"
    stuck.parent.mkdir(parents=True)
    stuck.write_bytes(b"a")
    other.write_bytes(b"b")
    real = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == stuck:
            raise PermissionError(13, "Permission denied")
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    disks = [foreign._Disk("a.qcow2", "n0", stuck), foreign._Disk("b.qcow2", "n1", other)]
    with QMPClient.connect(path) as c, pytest.raises(VMControlError, match="never merge it again"):
        foreign._merge_back(c, area, disks)
    assert stuck.exists() and not other.exists()
