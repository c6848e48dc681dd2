"""Remotes: sharing entries through any git server (FORMAT.md, "Sharing").

The transfer is git's own, through dulwich's client: local paths,
``file://``, ``git://``, ``ssh://`` and ``http(s)://`` (smart HTTP).  VML
only decides which refs travel and how arriving entries are named::

    refs/vml/entries/<n>                   local E-numbers (never written remotely by vml push)
    refs/vml/shared/<commit>               what ``vml push`` creates on a remote: one ref per
                                           entry, named by its commit id, so pushers never collide
    refs/vml/remotes/<R>/entries/<n>       remote R's own E-numbers, as last fetched
    refs/vml/remotes/<R>/shared/<commit>   remote R's shared entries, as last fetched
    refs/remotes/<R>/<branch>              remote R's branches (git's usual place)
    vml/origins.json                       local: commit -> remote it came from, name there

The commit id is an entry's identity everywhere; an E-number is a local
alias.  Entries that arrive get the next free local numbers under the
repository lock, keyed by commit id, so one commit never gets two numbers.
A remote is configured as ``[remote "<R>"] url = ...`` with fetch refspecs
that say the same thing, so plain ``git fetch <R>`` fills the same refs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dulwich.errors import (
    ApplyDeltaError,
    ChecksumMismatch,
    GitProtocolError,
    HangupException,
    NotGitRepository,
)
from dulwich.objects import ObjectID
from dulwich.protocol import PEELED_TAG_SUFFIX, ZERO_SHA
from dulwich.refs import Ref, check_ref_format

from vml.errors import CorruptRepository, RemoteError, UsageError, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.keeps import SPOOL_PREFIX, claim, claim_line, unclaim
from vml.plumbing.repository import (
    Repository,
    fsync_dir,
    git_locked,
    write_atomic,
    write_config,
)
from vml.progress import ProgressFn, no_progress
from vml.values import check_plain_name

if TYPE_CHECKING:
    from dulwich.client import GitClient

SHARED_PREFIX = refs_mod.SHARED_PREFIX
TRACK_PREFIX = b"refs/vml/remotes/"
GIT_TRACK_PREFIX = b"refs/remotes/"
_HEX40 = re.compile(rb"^[0-9a-f]{40}$")


# -- configuration ----------------------------------------------------------


def check_remote_name(name: str) -> None:
    """Refuse remote names outside the rule (and any git would refuse as a ref component)."""
    check_plain_name(name, "remote")
    if not check_ref_format(Ref(b"refs/remotes/" + name.encode())):
        raise UsageError(f"{name!r} is not a valid remote name", "git refuses it as a ref")


def refspecs(name: str) -> list[bytes]:
    """The fetch refspecs written for remote ``name`` (git fetch follows them too)."""
    n = name.encode()
    return [
        b"+refs/heads/*:refs/remotes/" + n + b"/*",
        b"+refs/vml/entries/*:refs/vml/remotes/" + n + b"/entries/*",
        b"+refs/vml/shared/*:refs/vml/remotes/" + n + b"/shared/*",
    ]


def list_remotes(repo: Repository) -> dict[str, str]:
    """Configured remotes: name -> URL."""
    cfg = repo.git.get_config()
    out: dict[str, str] = {}
    for section in cfg.sections():
        if len(section) == 2 and section[0] == b"remote":
            try:
                out[section[1].decode()] = cfg.get(section, b"url").decode()
            except KeyError:
                continue
    return dict(sorted(out.items()))


def remote_url(repo: Repository, name: str) -> str:
    """The URL of remote ``name``."""
    remotes = list_remotes(repo)
    if name not in remotes:
        known = ", ".join(remotes) or "none"
        raise UsageError(
            f"no remote named {name!r} (configured: {known})", "add it with `vml remote add`"
        )
    return remotes[name]


def add_remote(repo: Repository, name: str, url: str) -> None:
    """Configure remote ``name`` at ``url``."""
    check_remote_name(name)
    if not url.strip():
        raise UsageError("the remote URL is empty", "give a path or a URL")
    if name in list_remotes(repo):
        raise UsageError(f"remote {name!r} exists", "remove it first, or choose another name")
    cfg = repo.git.get_config()
    section = (b"remote", name.encode())
    cfg.set(section, b"url", url.encode())
    for spec in refspecs(name):
        cfg.add(section, b"fetch", spec)
    write_config(cfg)


def remove_remote(repo: Repository, name: str) -> int:
    """Forget remote ``name`` and its tracking refs (local entries stay); returns refs removed.

    The refs go first: stopped half way, the remote is still configured and
    the same command finishes (its next fetch would bring the refs back).
    """
    remote_url(repo, name)
    gone = tracking_refs(repo, name)
    refs_mod.move_refs(repo, [refs_mod.RefMove(ref, None) for ref in gone])
    cfg = repo.git.get_config()
    del cfg[(b"remote", name.encode())]
    write_config(cfg)
    return len(gone)


def tracking_refs(repo: Repository, name: str) -> list[bytes]:
    """Every ref that tracks remote ``name``."""
    n = name.encode()
    prefixes = (TRACK_PREFIX + n + b"/", GIT_TRACK_PREFIX + n + b"/")
    return sorted(r for r in repo.git.refs.allkeys() if r.startswith(prefixes))


# -- where entries came from (local bookkeeping) ----------------------------


@dataclass
class Origin:
    """Where an entry first arrived from."""

    remote: str
    url: str
    name: str  # the remote's E-number when it had one, else ""

    def describe(self) -> str:
        """``origin E5``, or ``origin`` when the remote had no number for it."""
        return f"{self.remote} {self.name}".strip()


def _origins_path(repo: Repository) -> Path:
    return repo.vml_dir / "origins.json"


def read_origins(repo: Repository) -> dict[bytes, Origin]:
    """Commit id -> origin, for entries that arrived by fetch or clone."""
    try:
        with open(_origins_path(repo), "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    out: dict[bytes, Origin] = {}
    for hexid, o in doc.get("origins", {}).items():
        if isinstance(o, dict) and re.fullmatch(r"[0-9a-f]{40}", str(hexid)):
            out[bytes.fromhex(hexid)] = Origin(
                str(o.get("remote", "")), str(o.get("url", "")), str(o.get("name", ""))
            )
    return out


def record_origins(repo: Repository, new: Mapping[bytes, Origin]) -> None:
    """Record where entries numbered now came from (call under the repository lock).

    Written before the refs that number the entries (a fetch killed between
    leaves an origin no entry uses yet, never an entry without one): the new
    origin replaces what a fetch that never numbered them (killed, or its
    entry since removed) left.
    """
    if not new:
        return
    current = read_origins(repo)
    current.update(new)
    doc = {
        "origins": {
            c.hex(): {"remote": o.remote, "url": o.url, "name": o.name}
            for c, o in sorted(current.items())
        }
    }
    repo.vml_dir.mkdir(exist_ok=True)
    write_atomic(_origins_path(repo), json.dumps(doc, indent=1).encode())


# -- transport ---------------------------------------------------------------


def open_transport(
    repo: Repository | None, url: str, ssh_command: str | None = None
) -> tuple[GitClient, str]:
    """A dulwich client and the path on it for ``url``."""
    # Only transfers need the client (`vml log` reads origins.json here too).
    from dulwich.client import get_transport_and_path

    try:
        config = repo.git.get_config_stack() if repo is not None else None
        return get_transport_and_path(url, config=config, ssh_command=ssh_command)
    except (ValueError, KeyError) as e:
        raise UsageError(
            f"cannot use {url!r} as a remote ({e})",
            "give a path, file://, git://, ssh:// or http(s):// URL",
        ) from None


def source_damage(e: BaseException) -> str | None:
    """What a local source repository failed to read, when that is why a transfer failed.

    dulwich serves a local path in this process: a missing object shows as
    a KeyError, a damaged one as a zlib or checksum error (possibly hidden
    behind an error while closing the pack).
    """
    seen: BaseException | None = e
    for _depth in range(8):
        if seen is None:
            return None
        if isinstance(seen, KeyError):
            return f"object {str(seen).strip(chr(39) + 'b')} is missing"
        if isinstance(seen, zlib.error | ChecksumMismatch | ApplyDeltaError):
            return f"an object does not read: {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


def transport_error(url: str, e: BaseException) -> VMLError:
    """A one-line error for a failed transfer."""
    from dulwich.client import HTTPUnauthorized

    if isinstance(e, HTTPUnauthorized):
        return RemoteError(f"{url} refused the credentials", "check the user name and password")
    if isinstance(e, NotGitRepository):
        return RemoteError(f"no repository at {url}", "check the URL")
    if isinstance(e, HangupException | GitProtocolError):
        text = str(e).strip() or type(e).__name__
        return RemoteError(
            f"{url}: {text}",
            "check the URL and that the server allows this; if the remote's repository is "
            "damaged (run `vml fsck` there), fetch the entries it can still send by name",
        )
    damage = source_damage(e)
    if damage is not None:  # a local repository lacks or cannot read what it advertised
        return RemoteError(
            f"{url} cannot send what was asked: its repository is damaged ({damage})",
            "run `vml fsck` there; fetch the entries it can still send by name, e.g. "
            "`vml fetch origin E1`",
        )
    if isinstance(e, OSError):
        return RemoteError(
            f"cannot reach {url} ({e.strerror or e})", "check the URL and the network"
        )
    return RemoteError(f"{url}: {e}", "check the URL")


def _plain_refs(refs: Mapping[Any, Any]) -> dict[bytes, bytes]:
    """Advertised refs as name -> hex id, without peeled-tag lines or empty values."""
    return {
        bytes(k): bytes(v)
        for k, v in refs.items()
        if v is not None and not k.endswith(PEELED_TAG_SUFFIX)
    }


def ls_remote(client: GitClient, path: str) -> dict[bytes, bytes]:
    """The remote's refs: name -> hex commit id (peeled tag lines dropped)."""
    result = client.get_refs(path.encode() if isinstance(path, str) else path)
    return _plain_refs(result.refs)


class _PackSink:
    """Receives a pack from the wire into a spooled temporary file, counting bytes."""

    def __init__(self, repo: Repository, progress: ProgressFn) -> None:
        # Spooled in memory up to 16 MiB, then on disk in the object folder
        # (same file system as the final pack, and unnamed: a killed fetch
        # leaves nothing behind).
        self.file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by the caller)
            max_size=16 << 20, dir=str(repo.objects_dir)
        )
        self.bytes = 0
        self.objects = 0
        self._head = b""
        self._progress = progress

    def __call__(self, data: bytes) -> int:
        self.file.write(data)
        self.bytes += len(data)
        if len(self._head) < 12:
            self._head += data[:12]
            if len(self._head) >= 12 and self._head[:4] == b"PACK":
                self.objects = int.from_bytes(self._head[8:12], "big")
        self._progress("bytes", self.bytes, 0)
        return len(data)


def _index_progress(progress: ProgressFn) -> Callable[[bytes], None]:
    pattern = re.compile(rb"(\d+)/(\d+)")

    def report(msg: bytes | str) -> None:
        data = msg.encode() if isinstance(msg, str) else msg
        m = pattern.search(data)
        if m:
            progress("objects", int(m.group(1)), int(m.group(2)))

    return report


@dataclass
class Received:
    """What one fetch brought.

    ``keeps`` are the ``vml-pending`` markers guarding the new pack from a
    concurrent gc until refs reach it: call :meth:`release` once they do
    (or once the fetch failed: the pack is then garbage).
    """

    refs: dict[bytes, bytes]  # every remote ref (hex values)
    objects: int = 0
    size: int = 0  # bytes transferred
    keeps: list[Path] = field(default_factory=list)
    packs: list[Path] = field(default_factory=list)  # the pack files that arrived
    claim: str = ""  # this fetch's claim line in those .keep files

    def taken(self) -> bool:
        """True when a pack that arrived is gone already (a concurrent gc took it)."""
        return any(not p.exists() for p in self.packs)

    def release(self) -> None:
        """Drop the pending markers: the new pack's objects are reachable now (or garbage)."""
        _release(self.keeps, self.claim)
        self.keeps = []


def _release(keeps: list[Path], line: str) -> None:
    for keep in keeps:
        unclaim(keep, line)


def _pending_keep(keep: Path, line: str) -> bool:
    """Add this fetch's claim to ``keep`` (keeps.py); False when a foreign .keep protects.

    Another process may claim the same pack (the same objects fetched
    twice): each claim is its own line, and dropping ours leaves theirs.
    Marked shared: no writer that published a pack of this name deletes it.
    """
    keep.parent.mkdir(parents=True, exist_ok=True)
    return claim(keep, line, shared=True)


def _add_pack_kept(
    repo: Repository, data: Callable[[int], bytes], progress: ProgressFn, line: str
) -> list[Path]:
    """Index the fetched pack into the store, guarded by a pending .keep.

    dulwich names the pack from its object ids (``_get_pack_basepath``),
    then renames the .pack into place and writes the .idx; the marker is
    written when the name is known, before either appears, so gc never sees
    the pack unprotected.  Should a dulwich version name packs another way,
    the marker follows right after (a short window: fetch also checks, under
    the lock, that what it is about to reference still exists).
    """
    store = repo.git.object_store
    keeps: list[Path] = []
    name_of = store._get_pack_basepath

    def named(entries: Iterable[tuple[bytes, int, int | None]]) -> str:
        base = name_of(entries)
        keep = Path(base + ".keep")
        if _pending_keep(keep, line):
            keeps.append(keep)
        return base

    spool: list[Path] = []

    def read(n: int) -> bytes:
        if not spool:  # dulwich has made its temporary file and holds it open
            spool.append(_held_spool(repo.objects_dir))
        return data(n)

    setattr(store, "_get_pack_basepath", named)  # noqa: B010 (shadow the method on this store only)
    try:
        pack = store.add_thin_pack(read, None, progress=_index_progress(progress))
        keep = repo.objects_dir / "pack" / f"pack-{pack.name().decode()}.keep"
        if keep not in keeps and _pending_keep(keep, line):
            keeps.append(keep)
    except BaseException:
        _release(keeps, line)
        for p in spool:  # a pack that failed to index leaves no file behind
            if p != _NO_SPOOL:
                p.unlink(missing_ok=True)
        raise
    finally:
        delattr(store, "_get_pack_basepath")
    return keeps


_NO_SPOOL = Path("/")


def _held_spool(objects_dir: Path) -> Path:
    """The ``objects/tmp_pack_*`` file this process holds open: the one dulwich is writing.

    Found through our own open files, so a failure removes this fetch's
    file and never another's (two fetches may write one at once).
    """
    fd_dir = Path("/proc/self/fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return _NO_SPOOL
    for fd in fds:
        try:
            target = Path(os.readlink(fd_dir / fd))
        except OSError:
            continue
        if target.parent == objects_dir.resolve() and target.name.startswith(SPOOL_PREFIX):
            return target
    return _NO_SPOOL


def local_heads(repo: Repository) -> list[ObjectID]:
    """Every commit a local ref holds: what we tell the server we have."""
    out: set[bytes] = set()
    store = repo.git.object_store
    for name in repo.git.refs.allkeys():
        if name == b"HEAD":
            continue
        try:
            value = repo.git.refs[name]
        except KeyError:
            continue
        if value in store:
            out.add(bytes(value))
    return [ObjectID(v) for v in sorted(out)]


def make_durable(repo: Repository, pack_dir: Path, before: set[str]) -> list[Path]:
    """fsync the pack files that arrived (dulwich renames them without); returns the packs.

    Before any ref points into them.
    """
    arrived: list[Path] = []
    for name in sorted(set(os.listdir(pack_dir)) - before):
        if name.startswith("pack-") and name.endswith(".pack"):
            arrived.append(pack_dir / name)
        if name.startswith("pack-"):
            fd = os.open(pack_dir / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(pack_dir)
    repo.reopen_store()
    return arrived


def receive(
    repo: Repository,
    client: GitClient,
    path: str,
    url: str,
    choose: Callable[[dict[bytes, bytes]], Iterable[bytes]],
    progress: ProgressFn = no_progress,
) -> Received:
    """Fetch the objects of the commits ``choose(remote refs)`` returns (hex ids).

    Objects land in one new pack (dulwich indexes it and appends the bases
    of a thin pack); its files are made durable before this returns, so
    the caller can point refs at what arrived.  The pack carries a
    ``vml-pending`` .keep (``Received.keeps``) so a concurrent gc leaves it
    alone: the caller must call ``Received.release()`` once its refs are set
    (or it gave up).
    """
    seen: dict[bytes, bytes] = {}
    wanted: list[ObjectID] = []
    store = repo.git.object_store

    def determine_wants(refs: Mapping[Ref, ObjectID], depth: int | None = None) -> list[ObjectID]:
        seen.update(_plain_refs(refs))
        wanted.clear()
        for hexid in dict.fromkeys(choose(dict(seen))):
            if hexid != ZERO_SHA and ObjectID(hexid) not in store:
                wanted.append(ObjectID(hexid))
        return list(wanted)

    sink = _PackSink(repo, progress)
    keeps: list[Path] = []
    line = claim_line(f"fetch.{os.urandom(6).hex()}")
    pack_dir = repo.objects_dir / "pack"
    pack_dir.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(pack_dir))
    try:
        try:
            result = client.fetch_pack(
                path.encode(),
                determine_wants,
                repo.git.get_graph_walker(local_heads(repo)),
                sink,
                progress=None,
            )
        except VMLError:
            raise
        except Exception as e:
            raise transport_error(url, e) from None
        if wanted and sink.bytes:
            sink.file.seek(0)
            try:
                # A fetch of the same pack killed while dulwich wrote its index
                # left ``pack-<id>.idx.lock``: one line naming it, not "damaged".
                with git_locked():
                    keeps = _add_pack_kept(repo, sink.file.read, progress, line)
            except VMLError:
                raise
            except Exception as e:
                raise CorruptRepository(
                    f"the pack from {url} is damaged ({e}); nothing was kept",
                    "run the same command again; if it fails again, the remote's repository "
                    "is damaged: run `vml fsck` there, and fetch the entries it can still "
                    "send by name",
                ) from None
    finally:
        sink.file.close()
    try:
        arrived = make_durable(repo, pack_dir, before)
    except BaseException:
        _release(keeps, line)
        raise
    refs = _plain_refs(result.refs) or seen
    if not wanted:
        return Received(refs, keeps=keeps, claim=line)
    progress("objects", sink.objects, sink.objects)
    return Received(refs, sink.objects, sink.bytes, keeps, arrived, line)


def hex_of(ref_value: bytes) -> bytes:
    """Check a hex commit id from the wire."""
    if not _HEX40.match(ref_value):
        raise CorruptRepository(f"the remote sent a malformed object id {ref_value[:60]!r}")
    return ref_value
