"""``vml push``: send entries (with their chains), branches and tags to a remote.

Each entry travels as ``refs/vml/shared/<commit id>`` on the remote, never
as an E-number, so a push cannot clobber anyone's numbering; the receiving
side numbers entries when it fetches (FORMAT.md, "Sharing").  Branches move
only forward unless ``force``; tags are created, never moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vml.errors import CorruptRepository, RemoteError, RepositoryNotFound, UsageError
from vml.plumbing import arrivals, sending
from vml.plumbing import refs as refs_mod
from vml.plumbing import remotes as remotes_mod
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.verify import reach_problem
from vml.porcelain.common import label
from vml.porcelain.fetch import tracking_name
from vml.progress import ProgressFn, no_progress
from vml.records import Record


@dataclass
class PushResult(Record):
    """What ``vml push`` did."""

    remote: str
    url: str
    entries: list[str] = field(default_factory=list)  # entries the remote did not have
    branches: dict[str, str] = field(default_factory=dict)  # branch -> entry
    tags: list[str] = field(default_factory=list)
    objects: int = 0
    size: int = 0  # bytes transferred


@dataclass
class _Wanted:
    """What a push sends: entries (with their chains), branches and tags."""

    commits: set[bytes] = field(default_factory=set)
    branches: dict[str, bytes] = field(default_factory=dict)
    tags: dict[str, bytes] = field(default_factory=dict)  # tag -> raw ref value (annotated kept)


def _wanted(
    repo: Repository, table: refs_mod.RefTable, names: Sequence[str], all_entries: bool, tags: bool
) -> _Wanted:
    """Resolve what the command line names; refuses an empty push."""
    w = _Wanted()
    tag_names: set[str] = set(table.tags) if tags else set()
    if all_entries:
        w.commits |= set(table.entries.values())
        w.branches.update(table.branches)
    for name in names:
        if name in table.branches:
            w.branches[name] = table.branches[name]
        elif name in table.tags:
            tag_names.add(name)
        else:
            w.commits.add(refs_mod.resolve_name(repo, name, table))
    w.commits |= set(w.branches.values())
    w.commits |= {table.tags[t] for t in tag_names}
    if not w.commits:
        raise UsageError(
            "nothing to push", "name the entries, branches or tags to push, or use --all"
        )
    w.tags = {t: bytes(repo.git.refs[refs_mod.TAG_PREFIX + t.encode()]) for t in tag_names}  # type: ignore[index]
    return w


def _check_whole(reader: PackReader, table: refs_mod.RefTable, commits: set[bytes]) -> None:
    """An entry goes whole or not at all: never one the remote could not rebuild."""
    memo: dict[bytes, str | None] = {}
    for c in sorted(commits):
        why = reach_problem(reader, c, set(), memo)
        if why is not None:
            raise CorruptRepository(
                f"{label(table, c)} cannot be sent: {why}; nothing was sent",
                "run `vml fsck` to see which entries are damaged; push the others by name",
            )


def _updates(
    reader: PackReader,
    table: refs_mod.RefTable,
    chain: Sequence[bytes],
    w: _Wanted,
    remote: str,
    force: bool,
    res: PushResult,
) -> Callable[[dict[bytes, bytes]], dict[bytes, bytes]]:
    """The ref updates to ask of the remote, given the refs it holds; fills ``res``."""

    def update(remote_refs: dict[bytes, bytes]) -> dict[bytes, bytes]:
        if remote_refs and not any(r.startswith(_VML) for r in remote_refs):
            raise RepositoryNotFound(
                f"{remote} holds refs but no VML entries (a plain git repository?); nothing was sent",
                "push to an empty repository (`git init --bare`) or one VML shares entries through",
            )
        have = set(remote_refs.values())
        new: dict[bytes, bytes] = {}
        rejected: list[str] = []
        res.entries.clear()
        for c in sorted(chain, key=lambda c: table.number_of(c) or 1 << 62):
            h = c.hex().encode()
            if h not in have:
                new[remotes_mod.SHARED_PREFIX + h] = h
                res.entries.append(label(table, c) or c.hex()[:12])
        for b, c in sorted(w.branches.items()):
            ref = refs_mod.BRANCH_PREFIX + b.encode()
            old = remote_refs.get(ref)
            h = c.hex().encode()
            if old == h:
                continue
            if (
                old is not None
                and not force
                and not arrivals.is_ancestor(reader, bytes.fromhex(old.decode()), c)
            ):
                rejected.append(b)
                continue
            new[ref] = h
            res.branches[b] = label(table, c) or c.hex()[:12]
        for t, value in sorted(w.tags.items()):
            ref = refs_mod.TAG_PREFIX + t.encode()
            old = remote_refs.get(ref)
            if old == value:
                continue
            if old is not None:
                rejected.append(f"tag {t}")
                continue
            new[ref] = value
            res.tags.append(t)
        if rejected:
            raise RemoteError(
                f"{remote} holds other entries on {', '.join(rejected)}",
                f"run `vml pull {remote}` first, or push with --force (branches only)",
            )
        return new

    return update


_VML = b"refs/vml/"
# What receive-pack says of the refs an atomic push left alone because another failed.
_COLLATERAL = ("atomic push failed", "atomic transaction failed")


def _refused(remote: str, sent: sending.Sent) -> RemoteError:
    """One line for refs the remote refused: which, why, and what to do."""
    failed = sorted(sent.failed.items())
    ref, why = next(((r, w) for r, w in failed if w not in _COLLATERAL), failed[0])
    lines = [ln.decode(errors="replace") for ln in sent.said]
    errors = [ln for ln in lines if ln.startswith(("error:", "fatal:"))]
    words = errors or [ln for ln in lines if "%" not in ln]
    server = f" (it said: {words[0][:200]})" if words else ""
    nothing = "" if sent.updated else "; it moved no ref"
    if "hook" in why:
        remedy = "the server's policy refuses this push: ask its administrator"
    elif ".lock" in server or "lock" in why or "failed to update" in why:
        remedy = (
            "another push there may be running (or a killed one left a `.lock` file on the "
            "server): run the push again later"
        )
    else:
        remedy = "check the server's permissions and run the push again"
    return RemoteError(f"{remote} refused {ref.decode()}: {why}{server}{nothing}", remedy)


def _track(repo: Repository, remote: str, updated: dict[bytes, bytes]) -> None:
    """Remember what the remote now holds, as git does after a push."""
    moves: list[refs_mod.RefMove] = []
    for ref, value in sorted(updated.items()):
        # where a fetch keeps them (tags pushed are the local ones already)
        target = tracking_name(remote, ref) if not ref.startswith(refs_mod.TAG_PREFIX) else None
        if target is not None:
            moves.append(refs_mod.RefMove(target, bytes.fromhex(value.decode())))
    with repo.lock():
        refs_mod.move_refs(repo, moves)


def push(
    repo: Repository,
    remote: str | None = None,
    names: Sequence[str] = (),
    *,
    all_entries: bool = False,
    tags: bool = False,
    force: bool = False,
    ssh_command: str | None = None,
    progress: ProgressFn = no_progress,
) -> PushResult:
    """Push ``names`` (entries, branches, tags), or every entry and branch with ``all_entries``."""
    remotes = remotes_mod.list_remotes(repo)
    if remote is None:
        if not remotes:
            raise UsageError("no remote is configured", "add one with `vml remote add`")
        remote = "origin" if "origin" in remotes else next(iter(remotes))
    url = remotes_mod.remote_url(repo, remote)
    table = refs_mod.read_refs(repo)
    w = _wanted(repo, table, names, all_entries, tags)
    reader = PackReader(repo)
    try:
        chain = arrivals.chain_entries(reader, w.commits, set())
        _check_whole(reader, table, w.commits | set(chain))
        res = PushResult(remote, url)
        update = _updates(reader, table, list(chain), w, remote, force, res)
        client, path = remotes_mod.open_transport(repo, url, ssh_command)
        sent = sending.send(repo, client, path, url, update, progress)
    finally:
        reader.close()
    if sent.failed:
        raise _refused(remote, sent)
    res.objects, res.size = sent.objects, sent.size
    _track(repo, remote, sent.updated)
    return res
