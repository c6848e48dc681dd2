"""``vml fetch``: bring a remote's entries (or one entry's chain) into this repository.

What arrives is tracked under ``refs/vml/remotes/<remote>/`` and
``refs/remotes/<remote>/``; every entry that is new here gets the next local
E-number (FORMAT.md, "Sharing").  Entries pushed straight into this
repository (``refs/vml/shared/*``) are numbered too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from dulwich.object_store import peel_sha
from dulwich.objects import ObjectID

from vml.errors import (
    CorruptRepository,
    RepositoryBusy,
    RepositoryNotFound,
    UnknownEntry,
    UsageError,
)
from vml.plumbing import arrivals
from vml.plumbing import refs as refs_mod
from vml.plumbing import remotes as remotes_mod
from vml.plumbing.chains import read_entry
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.verify import reach_problem
from vml.progress import ProgressFn, no_progress
from vml.records import Record
from vml.values import entry_number

_ENTRIES = b"refs/vml/entries/"
_VML_REFS = (_ENTRIES, remotes_mod.SHARED_PREFIX)


@dataclass
class NewEntry(Record):
    """An entry that got a local number."""

    entry: str  # local E-number
    commit: str
    remote_entry: str  # the remote's E-number, or ""


@dataclass
class NotArrived(Record):
    """A ref the remote advertised whose objects did not all arrive: nothing here names it."""

    name: str  # as the remote calls it: E5, branch main, tag v1, or a commit id
    commit: str
    reason: str


@dataclass
class FetchResult(Record):
    """What ``vml fetch`` did."""

    remote: str
    url: str
    objects: int = 0
    size: int = 0  # bytes transferred
    new_entries: list[NewEntry] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # remote branch -> entry
    tags: list[str] = field(default_factory=list)  # new local tags
    tag_conflicts: list[str] = field(default_factory=list)  # tags kept as they were here
    # What the remote advertised but could not send whole (its repository is
    # damaged): left out entirely, the rest arrived.
    not_arrived: list[NotArrived] = field(default_factory=list)

    json_names = (("size", "bytes"),)


def _number(tail: bytes) -> int | None:
    """The entry number in a ref name's tail, if it is one VML could have made."""
    ok = tail.isdigit() and len(tail) <= 18 and not tail.startswith(b"0")
    return int(tail) if ok else None


def tracking_name(remote: str, ref: bytes) -> bytes | None:
    """Where remote ref ``ref`` is kept here (None: not fetched)."""
    r = remote.encode()
    if ref.startswith(_ENTRIES) and _number(ref[len(_ENTRIES) :]) is not None:
        return remotes_mod.TRACK_PREFIX + r + b"/entries/" + ref[len(_ENTRIES) :]
    if ref.startswith(remotes_mod.SHARED_PREFIX) and remotes_mod._HEX40.match(
        ref[len(remotes_mod.SHARED_PREFIX) :]
    ):
        return remotes_mod.TRACK_PREFIX + r + b"/shared/" + ref[len(remotes_mod.SHARED_PREFIX) :]
    if ref.startswith(refs_mod.BRANCH_PREFIX):
        return remotes_mod.GIT_TRACK_PREFIX + r + b"/" + ref[len(refs_mod.BRANCH_PREFIX) :]
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
        n = entry_number(name)
        key = _ENTRIES + str(n).encode() if n is not None else None
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
            hexid = remotes_mod.hex_of(value)
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


def _display(ref: bytes, hexid: bytes) -> str:
    """A remote ref as a user knows it: E5, branch main, tag v1, or a commit id."""
    if ref.startswith(_ENTRIES):
        return "E" + ref[len(_ENTRIES) :].decode()
    if ref.startswith(refs_mod.BRANCH_PREFIX):
        return "branch " + ref[len(refs_mod.BRANCH_PREFIX) :].decode(errors="replace")
    if ref.startswith(refs_mod.TAG_PREFIX):
        return "tag " + ref[len(refs_mod.TAG_PREFIX) :].decode(errors="replace")
    return hexid.decode()[:12]


def arrived_whole(
    repo: Repository,
    remote: str,
    wanted: dict[bytes, bytes],
    taken: Callable[[], bool] = lambda: False,
) -> tuple[dict[bytes, bytes], list[NotArrived]]:
    """Split the refs a fetch asked for into those whose objects are all here, and the rest.

    The rule (FORMAT.md, "Sharing"): a ref is tracked, and the entries it
    reaches numbered, only when every object it reaches is here and reads
    (git's connectivity check; entries already here are not walked again),
    and an entry ref names a VML entry.  A remote with a damaged repository
    may advertise what it cannot send (a local one then sends the rest, a
    git server usually fails the whole transfer): whatever did not arrive
    whole is named, never half-referenced.  ``taken()`` tells whether a pack
    that arrived is gone meanwhile: then a concurrent gc, not the remote,
    is to blame, and the command is to be run again.
    """
    reader = PackReader(repo)
    try:
        done = set(refs_mod.read_refs(repo).entries.values())
        memo: dict[bytes, str | None] = {}
        ok: dict[bytes, bytes] = {}
        missing: list[NotArrived] = []
        for ref, value in sorted(wanted.items()):
            if tracking_name(remote, ref) is None:
                continue
            hexid = remotes_mod.hex_of(value)
            sha = bytes.fromhex(hexid.decode())
            if not reader.contains(sha):
                why: str | None = "the remote did not send it (is its object missing there?)"
            else:
                why = reach_problem(reader, sha, done, memo)
            if (
                why is None
                and ref.startswith((_ENTRIES, remotes_mod.SHARED_PREFIX))
                and sha not in done
            ):
                try:
                    read_entry(reader, sha)
                except CorruptRepository as err:
                    why = f"it is not a VML entry ({err.message})"
            if why is None:
                ok[ref] = value
                continue
            if taken():
                raise RepositoryBusy(
                    f"a concurrent `vml gc` removed objects this fetch brought ({hexid.decode()})",
                    "run the same command again",
                )
            missing.append(NotArrived(_display(ref, hexid), hexid.decode(), why))
        return ok, missing
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
    names: Sequence[str] = (),
    taken: Callable[[], bool] = lambda: False,
) -> FetchResult:
    """Point tracking refs at what arrived whole and number new entries (takes the lock).

    ``advertised`` (every ref the remote showed) names the remote's numbers
    of entries that came only as part of a chain, and what the fetch asked
    for beyond what the transport let through (``names`` selects, as in
    :func:`select`).  Refs whose objects did not all arrive are left out and
    listed in ``not_arrived``.
    """
    res = FetchResult(remote, url)
    asked = dict(chosen)
    if advertised:
        for ref, hexid in select(remote, advertised, names).items():
            asked.setdefault(ref, hexid)
    chosen, res.not_arrived = arrived_whole(repo, remote, asked, taken)
    # What tracks a ref that did not arrive stays as it was (the remote still has it).
    unchanged = {tracking_name(remote, ref) for ref in asked if ref not in chosen}
    hints, remote_names = _remote_numbers(advertised or {})
    with repo.lock():
        # A gc that ran between the pack's arrival and now may have taken
        # objects no ref held yet (a pack without its marker, or objects that
        # were already here unreferenced): never point a ref at a missing one.
        peeled = _check_present(repo, remote, chosen)
        moves, tips, wanted = _plan_refs(repo, remote, chosen, peeled, hints, remote_names, res)
        if prune:
            for ref in remotes_mod.tracking_refs(repo, remote):
                if ref not in wanted and ref not in unchanged:
                    moves.append(refs_mod.RefMove(ref, None))
        tips += _pushed_here(repo)
        made = arrivals.plan_numbers(repo, tips, hints, keep_hinted=keep_numbers)
        # Bookkeeping before the refs it describes, as objects before refs:
        # killed at any instant, no entry is left without its origin.
        origins = {
            c: remotes_mod.Origin(remote, url, remote_names.get(c, "")) for _n, c in made if remote
        }
        # One transaction: a ref lock in the way moves nothing, and writes
        # no origin.  Entries first (parents first), then what tracks the
        # remote, deletions last: every prefix a kill can leave is valid and
        # the same fetch completes it.
        with refs_mod.ref_transaction(repo, arrivals.entry_moves(made) + moves):
            remotes_mod.record_origins(repo, origins)
        refs_mod.note_numbers(repo, [n for n, _c in made])
    table = refs_mod.read_refs(repo)
    for n, c in made:
        res.new_entries.append(NewEntry(f"E{n}", c.hex(), remote_names.get(c, "")))
    for b, tip in list(res.branches.items()):
        num = table.number_of(bytes.fromhex(tip))
        res.branches[b] = f"E{num}" if num is not None else tip[:12]
    return res


def _remote_numbers(advertised: dict[bytes, bytes]) -> tuple[dict[bytes, int], dict[bytes, str]]:
    """The remote's E-number of each entry it advertised (the lowest, if several)."""
    hints: dict[bytes, int] = {}
    remote_names: dict[bytes, str] = {}
    for ref, hexid in sorted(advertised.items(), reverse=True):
        n = _number(ref[len(_ENTRIES) :]) if ref.startswith(_ENTRIES) else None
        if n is not None and remotes_mod._HEX40.match(hexid):
            hints[bytes.fromhex(hexid.decode())] = n
            remote_names[bytes.fromhex(hexid.decode())] = f"E{n}"
    return hints, remote_names


def _plan_refs(
    repo: Repository,
    remote: str,
    chosen: dict[bytes, bytes],
    peeled: dict[bytes, bytes],
    hints: dict[bytes, int],
    remote_names: dict[bytes, str],
    res: FetchResult,
) -> tuple[list[refs_mod.RefMove], list[bytes], set[bytes]]:
    """The tracking-ref and new-tag moves for what arrived; the tips to number; the refs tracked.

    Under the repository lock; writes nothing.  A tag that exists here on
    another commit is left as it is and reported as a conflict.
    """
    moves: list[refs_mod.RefMove] = []
    tips: list[bytes] = []
    wanted: set[bytes] = set()
    for ref, hexid in sorted(chosen.items()):
        hexid = remotes_mod.hex_of(hexid)
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
                moves.append(refs_mod.create(ref, bytes.fromhex(hexid.decode())))
                res.tags.append(name)
            elif old != hexid:
                res.tag_conflicts.append(name)
            continue
        wanted.add(target)
        if _current(repo, target) != hexid:
            moves.append(refs_mod.RefMove(target, bytes.fromhex(hexid.decode())))
        if ref.startswith(refs_mod.BRANCH_PREFIX):
            res.branches[ref[len(refs_mod.BRANCH_PREFIX) :].decode()] = commit.hex()
    return moves, tips, wanted


def _pushed_here(repo: Repository) -> list[bytes]:
    """Entries others pushed straight into this repository (``refs/vml/shared/*``)."""
    out = []
    for ref in repo.git.refs.allkeys():
        if ref.startswith(remotes_mod.SHARED_PREFIX):
            value = _current(repo, ref)
            if value is not None and remotes_mod._HEX40.match(value):
                out.append(bytes.fromhex(value.decode()))
    return out


def number_pushed(repo: Repository) -> list[NewEntry]:
    """Give E-numbers to entries pushed straight into this repository, as `vml fetch` does.

    A bare repository that received `vml push` (or a `git clone --mirror` of
    it) holds its entries as ``refs/vml/shared/<id>`` only; the CLI calls this
    when it opens a repository, so such entries are listed from the first use.
    """
    if not refs_mod.unnumbered_pushes(repo):
        return []
    return apply_fetched(repo, "", "", {}, prune=False).new_entries


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
    """Fetch from ``url`` (remote ``remote``) and name what arrived.

    A remote that has refs but no entry at all is refused before any object
    travels: it is a plain git repository, and what a fetch would take from
    it (its branches, its objects) no VML command could use or remove.
    """
    client, path = remotes_mod.open_transport(repo, url, ssh_command)
    chosen: dict[bytes, bytes] = {}

    def choose(refs: dict[bytes, bytes]) -> Iterable[bytes]:
        if refs and not any(r.startswith(_VML_REFS) for r in refs):
            raise RepositoryNotFound(
                f"{url} holds no VML entries (a plain git repository?)",
                "use a repository `vml init` made or `vml push` sent entries to",
            )
        chosen.clear()
        chosen.update(select(remote, refs, names))
        return list(chosen.values())

    got = remotes_mod.receive(repo, client, path, url, choose, progress)
    try:
        res = apply_fetched(
            repo,
            remote,
            url,
            chosen,
            prune=not names,
            keep_numbers=keep_numbers,
            advertised=got.refs,
            names=names,
            taken=got.taken,
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
    remotes = remotes_mod.list_remotes(repo)
    if remote is None:
        if not remotes:
            if names:
                raise UsageError("no remote is configured", "add one with `vml remote add`")
            return apply_fetched(repo, "", "", {}, prune=False)
        remote = "origin" if "origin" in remotes else next(iter(remotes))
    url = remotes_mod.remote_url(repo, remote)
    return fetch_into(repo, remote, url, names, ssh_command=ssh_command, progress=progress)
