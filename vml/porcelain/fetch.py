"""``vml fetch``: bring a remote's entries (or one entry's chain) into this repository.

What arrives is tracked under ``refs/vml/remotes/<remote>/`` and
``refs/remotes/<remote>/``; every entry that is new here gets the next local
E-number (FORMAT.md, "Sharing").  Entries pushed straight into this
repository (``refs/vml/shared/*``) are numbered too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dulwich.object_store import peel_sha
from dulwich.objects import ObjectID

from vml.errors import RepositoryBusy, UnknownEntry, UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing import remotes as rm
from vml.plumbing.packs import PackReader
from vml.plumbing.repository import Repository
from vml.porcelain.common import ProgressFn, no_progress

_E = re.compile(r"^[Ee]?([0-9]+)$")
_ENTRIES = b"refs/vml/entries/"


@dataclass
class NewEntry:
    """An entry that got a local number."""

    entry: str  # local E-number
    commit: str
    remote_entry: str  # the remote's E-number, or ""


@dataclass
class FetchResult:
    """What ``vml fetch`` did."""

    remote: str
    url: str
    objects: int = 0
    size: int = 0  # bytes transferred
    new_entries: list[NewEntry] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # remote branch -> entry
    tags: list[str] = field(default_factory=list)  # new local tags
    tag_conflicts: list[str] = field(default_factory=list)  # tags kept as they were here

    def to_json(self) -> dict[str, object]:
        """The ``--json`` form."""
        return {
            "remote": self.remote,
            "url": self.url,
            "objects": self.objects,
            "bytes": self.size,
            "new_entries": [e.__dict__ for e in self.new_entries],
            "branches": self.branches,
            "tags": self.tags,
            "tag_conflicts": self.tag_conflicts,
        }


def tracking_name(remote: str, ref: bytes) -> bytes | None:
    """Where remote ref ``ref`` is kept here (None: not fetched)."""
    r = remote.encode()
    if ref.startswith(_ENTRIES) and ref[len(_ENTRIES) :].isdigit():
        return rm.TRACK_PREFIX + r + b"/entries/" + ref[len(_ENTRIES) :]
    if ref.startswith(rm.SHARED_PREFIX) and rm._HEX40.match(ref[len(rm.SHARED_PREFIX) :]):
        return rm.TRACK_PREFIX + r + b"/shared/" + ref[len(rm.SHARED_PREFIX) :]
    if ref.startswith(refs_mod.BRANCH_PREFIX):
        return rm.GIT_TRACK_PREFIX + r + b"/" + ref[len(refs_mod.BRANCH_PREFIX) :]
    if ref.startswith(refs_mod.TAG_PREFIX):
        return ref
    return None


def select(remote: str, refs: dict[bytes, bytes], names: Sequence[str]) -> dict[bytes, bytes]:
    """The remote refs to fetch: all VML-relevant ones, or those ``names`` pick."""
    relevant = {k: v for k, v in refs.items() if tracking_name(remote, k) is not None}
    if not names:
        return relevant
    out: dict[bytes, bytes] = {}
    for name in names:
        m = _E.match(name.strip())
        key = _ENTRIES + m.group(1).encode() if m else None
        if key is not None and key in relevant:
            out[key] = relevant[key]
            continue
        hit = False
        for prefix in (refs_mod.BRANCH_PREFIX, refs_mod.TAG_PREFIX):
            k = prefix + name.encode()
            if k in relevant:
                out[k] = relevant[k]
                hit = True
                break
        if hit:
            continue
        low = name.lower().encode()
        if len(low) >= 4 and re.fullmatch(rb"[0-9a-f]+", low):
            values = {v for v in relevant.values() if v.startswith(low)}
            if len(values) == 1:
                v = values.pop()
                k = next(k for k in sorted(relevant) if relevant[k] == v)
                out[k] = v
                continue
            if len(values) > 1:
                raise UnknownEntry(f"{name!r} matches {len(values)} entries on {remote}")
        raise UnknownEntry(
            f"{remote} has no entry, branch or tag named {name!r}",
            "name it as the remote does: E5, a branch, a tag or a commit id",
        )
    return out


def _peel(repo: Repository, hexid: bytes) -> bytes:
    _unpeeled, obj = peel_sha(repo.git.object_store, ObjectID(hexid))
    return bytes.fromhex(obj.id.decode())


def _current(repo: Repository, ref: bytes) -> bytes | None:
    try:
        return bytes(repo.git.refs[ref])  # type: ignore[index]
    except KeyError:
        return None


def _check_present(repo: Repository, remote: str, chosen: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Peel every fetched tip (hex -> commit id), checking that each object exists now.

    Reads the packs afresh (call under the lock): what a concurrent gc
    deleted since the fetch shows as missing, and RepositoryBusy is raised
    before any ref moves.
    """
    reader = PackReader(repo)
    try:
        out: dict[bytes, bytes] = {}
        for ref, value in sorted(chosen.items()):
            hexid = rm.hex_of(value)
            if tracking_name(remote, ref) is None or hexid in out:
                continue
            commit: bytes | None = None
            if reader.contains(bytes.fromhex(hexid.decode())):
                try:
                    commit = _peel(repo, hexid)  # a tag's target may be gone too
                except KeyError:
                    commit = None
            if commit is None or not reader.contains(commit):
                raise RepositoryBusy(
                    f"a concurrent `vml gc` removed objects this fetch brought ({hexid.decode()})",
                    "run the same command again",
                )
            out[hexid] = commit
        return out
    finally:
        reader.close()


def apply_fetched(
    repo: Repository,
    remote: str,
    url: str,
    chosen: dict[bytes, bytes],
    *,
    prune: bool,
    keep_numbers: bool = False,
    advertised: dict[bytes, bytes] | None = None,
) -> FetchResult:
    """Point tracking refs at what arrived and number new entries (takes the lock).

    ``advertised`` (every ref the remote showed) names the remote's numbers
    of entries that came only as part of a chain.
    """
    res = FetchResult(remote, url)
    hints: dict[bytes, int] = {}
    remote_names: dict[bytes, str] = {}
    for ref, hexid in sorted((advertised or {}).items(), reverse=True):
        tail = ref[len(_ENTRIES) :]
        if ref.startswith(_ENTRIES) and tail.isdigit() and rm._HEX40.match(hexid):
            hints[bytes.fromhex(hexid.decode())] = int(tail)
            remote_names[bytes.fromhex(hexid.decode())] = f"E{int(tail)}"
    tips: list[bytes] = []
    with repo.lock():
        # A gc that ran between the pack's arrival and now may have taken
        # objects no ref held yet (a pack without its marker, or objects that
        # were already here unreferenced): never point a ref at a missing one.
        peeled = _check_present(repo, remote, chosen)
        wanted: set[bytes] = set()
        for ref, hexid in sorted(chosen.items()):
            hexid = rm.hex_of(hexid)
            target = tracking_name(remote, ref)
            if target is None:
                continue
            commit = peeled[hexid]
            tips.append(commit)
            if ref.startswith(_ENTRIES):
                n = int(ref[len(_ENTRIES) :])
                if commit not in hints or n < hints[commit]:
                    hints[commit] = n
                    remote_names[commit] = f"E{n}"
            if ref.startswith(refs_mod.TAG_PREFIX):
                old = _current(repo, ref)
                name = ref[len(refs_mod.TAG_PREFIX) :].decode()
                if old is None:
                    refs_mod.set_ref(repo, ref, bytes.fromhex(hexid.decode()), create=True)
                    res.tags.append(name)
                elif old != hexid:
                    res.tag_conflicts.append(name)
                continue
            wanted.add(target)
            if _current(repo, target) != hexid:
                refs_mod.set_ref(repo, target, bytes.fromhex(hexid.decode()))
            if ref.startswith(refs_mod.BRANCH_PREFIX):
                res.branches[ref[len(refs_mod.BRANCH_PREFIX) :].decode()] = commit.hex()
        if prune:
            for ref in rm.tracking_refs(repo, remote):
                if ref not in wanted:
                    refs_mod.delete_ref(repo, ref)
        # entries others pushed straight into this repository
        for ref in repo.git.refs.allkeys():
            if ref.startswith(rm.SHARED_PREFIX):
                value = _current(repo, ref)
                if value is not None and rm._HEX40.match(value):
                    tips.append(bytes.fromhex(value.decode()))
        made = rm.number_entries(repo, tips, hints, keep_hinted=keep_numbers)
        origins = {c: rm.Origin(remote, url, remote_names.get(c, "")) for _n, c in made if remote}
        rm.record_origins(repo, origins)
    table = refs_mod.read_refs(repo)
    for n, c in made:
        res.new_entries.append(NewEntry(f"E{n}", c.hex(), remote_names.get(c, "")))
    for b, tip in list(res.branches.items()):
        num = table.number_of(bytes.fromhex(tip))
        res.branches[b] = f"E{num}" if num is not None else tip[:12]
    return res


def fetch_into(
    repo: Repository,
    remote: str,
    url: str,
    names: Sequence[str] = (),
    *,
    keep_numbers: bool = False,
    ssh_command: str | None = None,
    progress: ProgressFn = no_progress,
) -> FetchResult:
    """Fetch from ``url`` (remote ``remote``) and name what arrived."""
    client, path = rm.open_transport(repo, url, ssh_command)
    chosen: dict[bytes, bytes] = {}

    def choose(refs: dict[bytes, bytes]) -> Iterable[bytes]:
        chosen.clear()
        chosen.update(select(remote, refs, names))
        return list(chosen.values())

    got = rm.receive(repo, client, path, url, choose, progress)
    try:
        res = apply_fetched(
            repo,
            remote,
            url,
            chosen,
            prune=not names,
            keep_numbers=keep_numbers,
            advertised=got.refs,
        )
    finally:
        # Refs reach the new pack now (or the fetch failed and it is
        # garbage): gc may judge it like any other.
        got.release()
    res.objects, res.size = got.objects, got.size
    return res


def fetch(
    repo: Repository,
    remote: str | None = None,
    names: Sequence[str] = (),
    *,
    ssh_command: str | None = None,
    progress: ProgressFn = no_progress,
) -> FetchResult:
    """``vml fetch [REMOTE [ENTRY...]]``: everything, or only the chains of ``names``.

    Without any configured remote (and none named), only numbers the entries
    others pushed straight into this repository.
    """
    remotes = rm.list_remotes(repo)
    if remote is None:
        if not remotes:
            if names:
                raise UsageError("no remote is configured", "add one with `vml remote add`")
            return apply_fetched(repo, "", "", {}, prune=False)
        remote = "origin" if "origin" in remotes else next(iter(remotes))
    url = rm.remote_url(repo, remote)
    return fetch_into(repo, remote, url, names, ssh_command=ssh_command, progress=progress)
