"""Pushing: sending entries to a remote (FORMAT.md, "Sharing"; ``vml push``).

Through dulwich's client to any git server, which moves the refs of an
atomic push all or none once the whole pack arrived; into a repository on
this machine the way a fetch writes one (:func:`_send_local`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dulwich.errors import GitProtocolError, HangupException
from dulwich.file import FileLocked
from dulwich.objects import ObjectID
from dulwich.pack import UnpackedObject
from dulwich.refs import Ref

from vml.errors import CorruptRepository, RemoteError, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.remotes import make_durable, source_damage, transport_error
from vml.plumbing.repository import Repository, is_repository, open_repository
from vml.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from dulwich.client import GitClient, SendPackResult


@dataclass
class Sent:
    """What one push sent."""

    objects: int = 0
    size: int = 0  # bytes transferred
    updated: dict[bytes, bytes] = field(default_factory=dict)  # remote ref -> hex
    failed: dict[bytes, str] = field(default_factory=dict)
    connected: bool = False  # the remote's refs were read: a failure after is in transit
    said: list[bytes] = field(default_factory=list)  # the server's side-band lines


def send(
    repo: Repository,
    client: GitClient,
    path: str,
    url: str,
    update: Callable[[dict[bytes, bytes]], dict[bytes, bytes]],
    progress: ProgressFn = no_progress,
) -> Sent:
    """Push: ``update(remote refs)`` returns the remote refs to set (hex values).

    Only objects the remote lacks travel (its refs are the haves).  Every
    object is sent whole, one at a time, so memory stays flat; the remote
    (git receive-pack) moves refs only after the whole pack arrived, and
    all of them or none (an atomic push, where the server offers it: a hook
    or a lock refusing one ref leaves the remote as it was).
    """
    sent = Sent()

    def update_refs(refs: dict[Ref, ObjectID]) -> dict[Ref, ObjectID]:
        plain = {bytes(k): bytes(v) for k, v in refs.items()}
        new = update(plain)
        sent.updated = dict(new)
        sent.connected = True
        return {Ref(k): ObjectID(v) for k, v in new.items()}

    def generate(
        have: Iterable[ObjectID],
        want: Iterable[ObjectID],
        *,
        ofs_delta: bool = False,
        progress: Callable[[bytes], None] | None = None,
    ) -> tuple[int, Iterator[UnpackedObject]]:
        store = repo.git.object_store
        known = [h for h in have if h in store]
        count, objects = repo.git.generate_pack_data(set(known), set(want), ofs_delta=ofs_delta)

        def counted() -> Iterator[UnpackedObject]:
            for done, obj in enumerate(objects, 1):
                sent.objects = done
                sent.size += obj.decomp_len or sum(len(c) for c in obj.decomp_chunks)
                report("objects", done, count)
                report("bytes", sent.size, 0)
                yield obj

        return count, counted()

    def heard(data: bytes) -> None:
        sent.said.extend(ln.strip() for ln in data.splitlines() if ln.strip())

    report = progress
    try:
        if _is_local(client):
            _send_local(repo, Path(path), url, update_refs, generate)
            return sent
        result = _send_atomic(client, path, update_refs, generate, heard)
    except VMLError:
        raise
    except Exception as e:
        damage = source_damage(e)
        if damage is not None:  # what is pushed is read here: this repository is damaged
            raise CorruptRepository(
                f"cannot send what was asked: this repository is damaged ({damage})",
                "run `vml fsck` to see which entries are affected",
            ) from None
        raise push_error(url, e, sent.connected, sent.said) from None
    for ref, error in (result.ref_status or {}).items():
        if error is not None:
            sent.failed[bytes(ref)] = error
            sent.updated.pop(bytes(ref), None)
    return sent


def _send_atomic(
    client: GitClient,
    path: str,
    update_refs: Callable[[dict[Ref, ObjectID]], dict[Ref, ObjectID]],
    generate: Callable[..., tuple[int, Iterator[UnpackedObject]]],
    heard: Callable[[bytes], None],
) -> SendPackResult:
    """``send_pack``, atomic where the server offers it (all refs or none)."""
    try:
        return client.send_pack(
            path.encode(), update_refs, generate_pack_data=generate, progress=heard, atomic=True
        )
    except GitProtocolError as e:
        if "does not support atomic" not in str(e):
            raise
    # An older server: each ref on its own (nothing was sent yet).
    return client.send_pack(path.encode(), update_refs, generate_pack_data=generate, progress=heard)


def _is_local(client: GitClient) -> bool:
    from dulwich.client import LocalGitClient

    return isinstance(client, LocalGitClient)


def _send_local(
    repo: Repository,
    target_path: Path,
    url: str,
    update_refs: Callable[[dict[Ref, ObjectID]], dict[Ref, ObjectID]],
    generate: Callable[..., tuple[int, Iterator[UnpackedObject]]],
) -> None:
    """Push into a repository on this machine as a server would, and as a fetch writes.

    dulwich's local client wrote the pack without an fsync and the refs one
    by one, holding no lock of the target: a ``.lock`` met half way left
    some refs moved, a power loss could keep refs to a pack that was never
    on the disk, and a `vml gc` there could judge the pack before its refs
    arrived.  Here a VML target's repository lock is held throughout (its
    gc decides under that lock), the pack is fsynced (and its folder) before
    any ref moves, and the refs move as one (:func:`refs.move_refs`).
    """
    if not is_repository(target_path):
        raise RemoteError(f"no repository at {url}", "check the URL")
    target = open_repository(target_path)
    try:
        # A VML repository's lock (its gc decides under it); a plain one gets no vml/ folder.
        vml = (target_path / "vml").is_dir()
        with target.lock(what="remote repository") if vml else contextlib.nullcontext():
            old = dict(refs_mod.all_refs(target))  # name -> hex
            new = update_refs({Ref(k): ObjectID(v) for k, v in old.items()})
            changes = {bytes(k): bytes(v) for k, v in new.items() if old.get(bytes(k)) != v}
            moves = [
                refs_mod.RefMove(
                    ref,
                    bytes.fromhex(value.decode()),
                    bytes.fromhex(old[ref].decode()) if ref in old else None,
                    check=True,
                )
                for ref, value in sorted(changes.items())
            ]
            store = target.git.object_store
            want = {ObjectID(v) for v in changes.values() if ObjectID(v) not in store}
            # Every ref's lock first (one in the way: nothing written), the
            # pack durable in the body, the refs renamed on leaving it.
            with refs_mod.ref_transaction(target, moves):
                if want:
                    pack_dir = target.objects_dir / "pack"
                    pack_dir.mkdir(parents=True, exist_ok=True)
                    before = set(os.listdir(pack_dir))
                    haves = {ObjectID(v) for v in old.values()}
                    count, records = generate(haves, want, ofs_delta=True)
                    store.add_pack_data(count, records)
                    make_durable(target, pack_dir, before)
    finally:
        target.close()


def push_error(url: str, e: BaseException, connected: bool, said: list[bytes]) -> VMLError:
    """A one-line error for a push that failed in transit: the remote moved no ref then."""
    from dulwich.errors import SendPackError

    server = f" (it said: {said[-1].decode(errors='replace')[:200]})" if said else ""
    if isinstance(e, FileLocked):  # a local repository's pack file, before any ref moved
        lock = os.fsdecode(e.lockfilename)
        return RemoteError(
            f"{url}: {os.fsdecode(e.filename)} is being written by another command ({lock} "
            "exists); no ref moved",
            f"run the push again; if no git or vml command runs there, remove {lock}",
        )
    if isinstance(e, SendPackError):
        text = str(e).strip() or "unpack failed"
        return RemoteError(
            f"{url} could not store what was sent ({text}){server}; it moved no ref",
            "check the server's disk space and its log, then run the push again",
        )
    if connected and isinstance(e, OSError | HangupException | GitProtocolError):
        why = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
        return RemoteError(
            f"the connection to {url} broke while sending ({why}){server}; the remote moved no ref",
            "check the server (its disk space, its log) and the network, then run the push again",
        )
    err = transport_error(url, e)
    if isinstance(e, HangupException | GitProtocolError):
        err.remedy = "check the URL and that the server accepts pushes there"
    return err
