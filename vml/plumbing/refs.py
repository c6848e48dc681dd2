"""Refs: every entry is held by ``refs/vml/entries/<n>``; tags and branches are git's own.

Entries are numbered ``E1``, ``E2``, ... in creation order in this
repository.  The number is a local alias; the commit id is the identity.
Refs move only after every object they point to is on disk, and each move is
an atomic rename (dulwich's lock-file protocol, the same as git's) followed by
an fsync of the folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dulwich.file import FileLocked, GitFile, _GitFile
from dulwich.objects import ObjectID
from dulwich.refs import DiskRefsContainer, Ref, SymrefLoop, check_ref_format

from vml.errors import AmbiguousEntry, HostileRepository, UnknownEntry, UsageError
from vml.plumbing.repository import (
    Repository,
    fsync_dir,
    git_locked,
    make_folder,
    write_atomic,
)
from vml.values import COMMIT_ID_FORM, check_plain_name, entry_number, shown

ENTRY_PREFIX = b"refs/vml/entries/"
#: Where `vml push` puts entries on a remote: one ref per entry, named by its commit id.
SHARED_PREFIX = b"refs/vml/shared/"
TAG_PREFIX = b"refs/tags/"
BRANCH_PREFIX = b"refs/heads/"


def entry_ref(n: int) -> bytes:
    """The ref that holds entry ``n``."""
    return ENTRY_PREFIX + str(n).encode()


def _hex(value: bytes) -> ObjectID:
    return ObjectID(value if len(value) == 40 else value.hex().encode())


@dataclass
class RefTable:
    """A snapshot of the repository's VML-relevant refs."""

    entries: dict[int, bytes]  # number -> binary commit id
    tags: dict[str, bytes]
    branches: dict[str, bytes]
    # commit -> number, built on first use: labels are asked for per entry
    _by_commit: dict[bytes, int] | None = field(default=None, repr=False, compare=False)

    def number_of(self, commit: bytes) -> int | None:
        """The E-number of ``commit``, if it has one (the lowest, if several)."""
        if self._by_commit is None:
            self._by_commit = {}
            for n, c in sorted(self.entries.items(), reverse=True):
                self._by_commit[c] = n
        return self._by_commit.get(commit)

    def label(self, commit: bytes | None) -> str | None:
        """``E3`` for a commit with an entry number, else a short commit id."""
        if commit is None:
            return None
        n = self.number_of(commit)
        return f"E{n}" if n is not None else commit.hex()[:12]

    def numbers(self) -> dict[bytes, int]:
        """Commit id -> E-number."""
        return {c: n for n, c in self.entries.items()}

    def labels(self) -> dict[bytes, list[str]]:
        """Commit id -> tag and branch names pointing at it."""
        out: dict[bytes, list[str]] = {}
        for name, c in sorted(self.tags.items()):
            out.setdefault(c, []).append(f"tag:{name}")
        for name, c in sorted(self.branches.items()):
            out.setdefault(c, []).append(name)
        return out


def all_refs(repo: Repository) -> Iterator[tuple[bytes, bytes]]:
    """Every ref but HEAD as ``(name, hex value)``; a looping symbolic ref is refused."""
    for name in repo.git.refs.allkeys():
        if name != b"HEAD":
            yield from _one_ref(repo, name)


#: A tag of a tag of ... deeper than this is refused as a target (git's own peel has no limit,
#: but no honest repository comes near it).
_MAX_TAG_DEPTH = 32


def peel(
    repo: Repository, name: bytes, value: bytes, commits: Container[bytes] = frozenset()
) -> bytes:
    """The hex id ref ``name`` (holding hex ``value``) finally names, through every tag object.

    The one place refs are peeled: a packed ref carries git's peeled line;
    a loose one (``git tag -a`` writes loose refs) is followed through its
    tag objects here, so a tag means the same however git stored it.  A
    target that cannot be read stays as it is: the checks then name it.
    ``commits`` (hex ids the caller knows an entry ref holds) end the walk
    without reading the object: a tag VML made, or one reaching an entry
    through its tag objects, costs no read of the entry's commit.
    """
    if value in commits:
        return value
    refs = repo.git.refs
    peeled = refs.get_peeled(Ref(name))
    # Git's peeled line is the packed ref's: a loose ref over it (git moves a
    # packed tag by writing a loose one, the packed line stays) is peeled here.
    if peeled is not None and refs.get_packed_refs().get(Ref(name)) == value:
        return bytes(peeled)
    store = repo.git.object_store
    sha = value
    for _ in range(_MAX_TAG_DEPTH):
        try:
            type_num, data = _loose(repo, sha) or store.get_raw(ObjectID(sha))
        except Exception:  # any damage: fsck and verify name it, not every read
            return sha
        if type_num != _TAG_TYPE:
            return sha
        target = _tag_object(data)
        if target is None:
            return sha
        sha = target
        if sha in commits:
            return sha
    return sha


_TAG_TYPE = 4
_TYPES = {b"commit": 1, b"tree": 2, b"blob": 3, b"tag": _TAG_TYPE}


def _loose(repo: Repository, sha: bytes) -> tuple[int, bytes] | None:
    """A loose object's type and the start of its data, or None when it is not loose.

    ``git tag -a`` writes its tag object loose: reading it here first spares
    a look-up in every pack's index, per tag, on every read of the refs.
    Peeling needs a tag's first line only, so only the start is inflated.
    """
    if not _HEX40.fullmatch(sha):
        return None
    path = repo.objects_dir / sha[:2].decode() / sha[2:].decode()
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
        head, _, body = zlib.decompressobj().decompress(raw, 1024).partition(b"\0")
    except (OSError, zlib.error):
        return None  # not loose, or a damaged copy: the store's reading decides
    kind, _, size = head.partition(b" ")
    if kind not in _TYPES or not size.isdigit():
        return None
    return _TYPES[kind], body


_OBJECT_LINE = re.compile(rb"object ([0-9a-f]{40})\n")
_HEX40 = re.compile(rb"[0-9a-f]{40}")


def _tag_object(data: bytes) -> bytes | None:
    """The ``object`` line of a tag object, or None when it has none (damaged)."""
    m = _OBJECT_LINE.match(data)
    return m.group(1) if m else None


def _entry_tail(tail: bytes) -> int | None:
    """The number of ``refs/vml/entries/<tail>``, or None when VML could not have made it."""
    if tail.isdigit() and tail.isascii() and len(tail) <= 18 and not tail.startswith(b"0"):
        return int(tail)
    return None


_LOOSE_VALUE = re.compile(rb"([0-9a-f]{40})\n?")
# A ref name part git always accepts (E-numbers, commit ids): no need to ask check_ref_format.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _refs_under(repo: Repository, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The refs named ``prefix...`` as ``(name, hex value)``, as :func:`all_refs` reads them."""
    refs = repo.git.refs
    for tail in sorted(refs.subkeys(Ref(prefix))):
        yield from _one_ref(repo, prefix + tail)


def _one_ref(repo: Repository, name: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Ref ``name`` as ``(name, hex value)`` through dulwich (nothing when it is gone)."""
    try:
        value = repo.git.refs[Ref(name)]
    except KeyError:
        return
    except SymrefLoop:
        raise HostileRepository(
            f"ref {name.decode(errors='replace')} is a symbolic ref that loops",
            f"delete it: git --git-dir {repo.path} update-ref -d --no-deref "
            f"{name.decode(errors='replace')}",
        ) from None
    yield name, value


def _flat_refs(repo: Repository, prefix: bytes) -> dict[bytes, bytes]:
    """Every ref named ``prefix...``: name -> hex value, what :func:`all_refs` gives for them.

    One listing of the prefix's folder and one small read per loose ref
    (dulwich's general path costs ~5 times as much per ref, and a repository
    holds a ref per entry, and one per entry pushed into it: thousands after
    months).  A loose ref that is not a plain object id (a symbolic ref,
    anything odd) and the refs in a folder below are read through dulwich,
    so every ref means what git and :func:`all_refs` make of it.  Loose refs
    are read before packed ones, as git reads them: a ``git pack-refs``
    beside us writes packed-refs before it deletes the loose refs.
    """
    out: dict[bytes, bytes] = {}
    seen: set[bytes] = set()
    try:
        listing = list(os.scandir(repo.path / prefix.decode()))
    except (FileNotFoundError, NotADirectoryError):
        listing = []
    for d in listing:
        name = prefix + os.fsencode(d.name)
        if d.is_dir():
            if not d.is_symlink():  # git does not follow a link to a folder of refs
                for tail in sorted(repo.git.refs.subkeys(Ref(name + b"/"))):
                    seen.add(name + b"/" + tail)
                    out.update(_one_ref(repo, name + b"/" + tail))
            continue
        if not _PLAIN_NAME.fullmatch(d.name) and not check_ref_format(Ref(name)):
            continue  # a lock file, a name git refuses: no ref
        try:
            fd = os.open(d.path, os.O_RDONLY)  # not open(): its buffered file costs 3x more
            try:
                raw = os.read(fd, 64)
            finally:
                os.close(fd)
        except OSError:
            raw = b""
        seen.add(name)
        m = _LOOSE_VALUE.fullmatch(raw)
        if m is not None:
            out[name] = m.group(1)
        else:
            out.update(_one_ref(repo, name))  # dulwich's rules, packed-refs included
    for name, v in repo.git.refs.get_packed_refs().items():
        if name.startswith(prefix) and name not in seen:
            out[name] = bytes(v)
    return out


def _entry_refs(repo: Repository) -> dict[int, bytes]:
    """Every entry ref: number -> binary commit id (:func:`_flat_refs`)."""
    out: dict[int, bytes] = {}
    for name, value in _flat_refs(repo, ENTRY_PREFIX).items():
        n = _entry_tail(name[len(ENTRY_PREFIX) :])
        if n is not None:
            out[n] = bytes.fromhex(value.decode())
    return out


def read_refs(repo: Repository) -> RefTable:
    """Read entry, tag and branch refs (peeling annotated tags).

    Only refs under these three prefixes are read: a repository also holds
    a tracking ref per fetched entry (``refs/vml/remotes/``), which nothing
    here needs.
    """
    entries = _entry_refs(repo)
    tags: dict[str, bytes] = {}
    branches: dict[str, bytes] = {}
    for name, value in _refs_under(repo, BRANCH_PREFIX):
        branches[name[len(BRANCH_PREFIX) :].decode()] = bytes.fromhex(value.decode())
    # A tag naming what an entry ref names needs no object read to be peeled:
    # it is that entry (whatever that ref holds, the tag means the same).
    held = {c.hex().encode() for c in entries.values()}
    for name, value in _refs_under(repo, TAG_PREFIX):
        tags[name[len(TAG_PREFIX) :].decode()] = bytes.fromhex(
            peel(repo, name, value, held).decode()
        )
    return RefTable(entries, tags, branches)


def resolve_name(repo: Repository, name: str, table: RefTable | None = None) -> bytes:
    """Turn ``E7``/``e7``/``7``, a tag, a branch or a commit-id prefix into a commit id.

    A name that reads in two of these ways as two different commits (a tag
    fetched from elsewhere named like an id prefix, ``1234`` both E1234 and
    a prefix) is ambiguous: :class:`AmbiguousEntry` says which readings.
    """
    table = read_refs(repo) if table is None else table
    readings: dict[bytes, list[str]] = {}
    n = entry_number(name)
    if n is not None and n in table.entries:
        readings.setdefault(table.entries[n], []).append(f"entry E{n}")
    if name in table.tags:
        readings.setdefault(table.tags[name], []).append(f"tag {name}")
    if name in table.branches:
        readings.setdefault(table.branches[name], []).append(f"branch {name}")
    low = name.lower()
    if COMMIT_ID_FORM.fullmatch(low):
        known = {*table.entries.values(), *table.tags.values(), *table.branches.values()}
        for c in sorted(c for c in known if c.hex().startswith(low)):
            readings.setdefault(c, []).append(f"commit {c.hex()[:12]}")
    if len(readings) == 1:
        return next(iter(readings))
    if readings:
        what = "; ".join(" = ".join(r) for r in readings.values())
        raise AmbiguousEntry(f"{shown(name)} names {len(readings)} commits: {what}")
    raise UnknownEntry(f"no entry named {shown(name)}")


def unnumbered_pushes(repo: Repository) -> bool:
    """True when an entry pushed here (``refs/vml/shared/*``) has no E-number yet.

    Cheap when nothing was pushed here (one listing of a folder that is not
    there), which is what every command pays to number such entries on first
    use; a repository others push into pays a small read per pushed entry.
    """
    shared = _flat_refs(repo, SHARED_PREFIX)
    if not shared:
        return False
    numbered = {c.hex().encode() for c in read_refs(repo).entries.values()}
    return any(value not in numbered for value in shared.values())


# The highest E-number this repository ever gave (local, in vml/): a number
# once given is never given to another entry, even after that entry is removed.
_LAST_NUMBER = "last-entry-number"


def _last_given(repo: Repository) -> int:
    try:
        text = (repo.vml_dir / _LAST_NUMBER).read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else 0


def next_number(repo: Repository, taken: Iterable[int]) -> int:
    """The number the next entry gets (call under the repository lock).

    Never one given before here: after ``vml rm E7``, the next save is E8, so
    a name a user wrote down never comes to mean another state.
    """
    return max(max(taken, default=0), _last_given(repo)) + 1


def note_numbers(repo: Repository, numbers: Iterable[int]) -> None:
    """Remember the numbers just given (call under the repository lock, after their refs)."""
    top = max(numbers, default=0)
    if top > _last_given(repo):
        repo.vml_dir.mkdir(exist_ok=True)
        write_atomic(repo.vml_dir / _LAST_NUMBER, f"{top}\n".encode())


def check_name(kind: str, name: str) -> None:
    """Refuse tag and branch names outside the rule, or that read as an E-number or commit id."""
    check_plain_name(name, kind, id_like=False)
    if not check_ref_format(Ref(b"refs/x/" + name.encode())):  # git's own rules, to be sure
        raise UsageError(f"{shown(name)} is not a valid {kind} name", "git refuses it as a ref")


def set_ref(
    repo: Repository, ref: bytes, new: bytes, old: bytes | None = None, *, create: bool = False
) -> None:
    """Point ``ref`` at ``new`` atomically (one :func:`move_refs`).

    With ``old``, only if the ref still holds it; with ``create``, only if the
    ref does not exist yet (entry refs are never overwritten).
    """
    check = create or old is not None
    move_refs(repo, [RefMove(ref, new, None if create else old, check=check)])


def delete_ref(repo: Repository, ref: bytes) -> None:
    """Remove ``ref`` (one :func:`move_refs`)."""
    move_refs(repo, [RefMove(ref, None)])


def _note_removed(repo: Repository, refs: Iterable[bytes]) -> None:
    """Before entry refs go: their numbers count as given, though their writer never noted them.

    A command killed between creating an entry ref and :func:`note_numbers`
    leaves the number unnoted; were that entry then removed, the next save
    would get its number again.  Noting it here, first, closes that window.
    """
    numbers = []
    for ref in refs:
        tail = ref[len(ENTRY_PREFIX) :] if ref.startswith(ENTRY_PREFIX) else b""
        if tail.isdigit() and len(tail) <= 18 and not tail.startswith(b"0"):
            numbers.append(int(tail))
    note_numbers(repo, numbers)


@dataclass(frozen=True)
class RefMove:
    """One ref change of :func:`move_refs`.

    ``new`` is a binary commit id, or None to delete the ref.  With
    ``check``, the ref must hold ``old`` now (None: must not exist).
    """

    ref: bytes
    new: bytes | None
    old: bytes | None = None
    check: bool = False


def create(ref: bytes, new: bytes) -> RefMove:
    """A move that makes ``ref``, which must not exist (entry refs are never overwritten)."""
    return RefMove(ref, new, None, check=True)


def move_refs(repo: Repository, moves: Sequence[RefMove]) -> None:
    """Move several refs as one (:func:`ref_transaction`)."""
    with ref_transaction(repo, moves):
        pass


@contextlib.contextmanager
def ref_transaction(repo: Repository, moves: Sequence[RefMove]) -> Iterator[None]:
    """Move several refs as one: every ref's lock first, then the writes (git's ref transaction).

    On entering, each ref's ``<ref>.lock`` is made (exclusively) before any
    ref changes, so a lock in the way (another git or vml command writing
    that ref, or one killed while it did) refuses the whole move with one
    :class:`RepositoryBusy` and nothing changed, and so does a ref not
    holding what ``check`` expects.  The body runs holding every lock (what
    must be written before the refs, and only if they can move); on leaving
    it, each new value is written and fsynced in its lock file and renamed
    into place, in the order given, deletions last, and the folders are
    fsynced.  An error in the body moves nothing.  A process killed between
    two of the renames (microseconds) leaves the later refs unmoved and
    their lock files, which the next write names, as after a killed git:
    callers order their moves so that every prefix is a valid state their
    command completes when run again.
    """
    if not moves:
        yield
        return
    refs = repo.git.refs
    assert isinstance(refs, DiskRefsContainer)  # a repository on disk
    if len({m.ref for m in moves}) != len(moves):
        raise ValueError("a ref moved twice in one transaction")
    for m in moves:
        if not check_ref_format(Ref(m.ref)):
            raise UsageError(f"{shown(m.ref.decode(errors='replace'))} is not a valid ref name")
    held: list[tuple[RefMove, _GitFile]] = []
    made: list[Path] = []
    done = False
    try:
        with git_locked():
            for m in moves:
                path = Path(os.fsdecode(refs.refpath(Ref(m.ref))))
                made += make_folder(path.parent)
                held.append((m, GitFile(path, "wb")))
            packed = refs.get_packed_refs()
            lock = repo.path / "packed-refs.lock"
            if any(m.new is None and m.ref in packed for m in moves) and lock.exists():
                raise FileLocked(str(repo.path / "packed-refs"), str(lock))
        for m, f in held:
            now = refs.read_loose_ref(Ref(m.ref)) or packed.get(Ref(m.ref))
            if m.check and now != (None if m.old is None else _hex(m.old)):
                raise UsageError(
                    f"{m.ref.decode()} moved while this command ran", "run the command again"
                )
            if m.new is not None:
                f.write(_hex(m.new) + b"\n")
        yield
        _note_removed(repo, [m.ref for m in moves if m.new is None])
        for m, f in held:
            if m.new is not None:
                f.close()  # fsync, rename into place
        for m, f in held:
            if m.new is None:
                Path(os.fsdecode(refs.refpath(Ref(m.ref)))).unlink(missing_ok=True)
                with git_locked():
                    refs._remove_packed_ref(Ref(m.ref))  # takes packed-refs.lock itself
                f.abort()
        done = True
    finally:
        for _m, f in held:
            if not f.closed:
                f.abort()
        if not done:
            for d in made:  # what a refused move made stays out of the repository
                with contextlib.suppress(OSError):
                    d.rmdir()
    for parent in sorted({(repo.path / m.ref.decode()).parent for m in moves}):
        if parent.exists():
            fsync_dir(parent)
