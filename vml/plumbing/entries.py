"""Entries: git commits whose tree holds one saved state of a VM.

Root tree of an entry's commit::

    vml-entry.json      metadata: kind, parent, origin area, every file
    files/<path>        small files, whole blobs at their area paths
    images/<path>/      large files: manifest + block map (see manifests.py)

The commit's parent is the entry's parent, so commits form the dependency
forest; the message carries the user's text and ``VML-*`` trailers.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath

from dulwich.objects import Commit, ObjectID, Tree

from vml.errors import CorruptRepository, HostileRepository, newer_or_unknown
from vml.plumbing.manifests import BLOB_MODE, TREE_MODE, parse_tree

META_NAME = b"vml-entry.json"
FILES_NAME = b"files"
IMAGES_NAME = b"images"
# A root blob that says the names below files/ and images/ are escaped (see
# escape_name); entries without it (older ones) hold the names as they are.
NAMES_NAME = b"vml-names"
NAMES_BLOB = b"escaped 1\n"
KINDS = ("full", "incremental", "differential")
AUTHOR = b"VML <vml@localhost>"
MAX_META_BYTES = 64 << 20
# The two modes git and VML give regular files: anything else (a symlink, a
# submodule, setuid bits) would be restored as something that was never saved.
FILE_MODES = (0o100644, 0o100755)


def git_mode(st_mode: int) -> int:
    """The git mode a file is saved with: executable or not (commit and status must agree)."""
    return 0o100755 if st_mode & 0o111 else 0o100644


# Linux's limits: a name of a folder or file, and a whole path given to the kernel.
NAME_MAX = 255
PATH_MAX = 4096


def check_relpath(path: str) -> str:
    """Refuse any path that could leave the area, touch VML's own folder, or not be written.

    Paths are ``str`` with the file system's bytes decoded as Linux does
    (UTF-8, undecodable bytes as surrogate escapes), so any name a Linux file
    system accepts round-trips.
    """
    raw = os.fsencode(path) if "\0" not in path else b""
    parts = raw.split(b"/")
    if (
        not raw
        or raw.startswith(b"/")
        or len(raw) >= PATH_MAX
        or any(p in (b"", b".", b"..") for p in parts)
        or parts[0] == b".vml"
    ):
        raise HostileRepository(f"entry names an unsafe path {shown(path)}")
    if any(len(p) > NAME_MAX for p in parts):
        raise HostileRepository(
            f"entry names a path this file system cannot hold (a name over {NAME_MAX} bytes): "
            f"{shown(path)}"
        )
    return path


def shown(path: str) -> str:
    """A path fit for a message: quoted, undecodable bytes and controls escaped."""
    return repr(os.fsencode(path).decode("utf-8", "backslashreplace"))


def escape_name(part: str) -> bytes:
    """A file or folder name as stored in an entry's tree.

    git refuses trees naming ``.git`` (and its HFS and NTFS aliases) and
    inspects files named like ``.gitmodules``; a VM's folder may hold any of
    them.  So a leading ``.``, every ``~`` and every ``%`` are stored as
    ``%2E``, ``%7E`` and ``%25``: no stored name can be one git treats
    specially, and :func:`unescape_name` gives the name back exactly.
    """
    out = bytearray()
    for i, b in enumerate(os.fsencode(part)):
        if b in (0x25, 0x7E) or (i == 0 and b == 0x2E):
            out += b"%%%02X" % b
        else:
            out.append(b)
    return bytes(out)


def unescape_name(stored: bytes) -> str:
    """The name :func:`escape_name` stored as ``stored``."""
    return os.fsdecode(urllib.parse.unquote_to_bytes(stored))


# Modification times are nanoseconds since 1970; the kernel takes any whole
# second a 64-bit signed number holds (and clamps to its file system's range).
MTIME_RANGE = (-(1 << 63) * 10**9, ((1 << 63) - 1) * 10**9 + 999_999_999)
PERM_BITS = 0o777


@dataclass
class FileRecord:
    """One file of an entry."""

    path: str
    kind: str  # "small" | "image"
    mode: int  # git's mode: 0o100644 or 0o100755
    mtime_ns: int
    size: int
    sha256: str
    perm: int | None = None  # rwx bits; None: saved before VML kept them

    @property
    def permissions(self) -> int:
        """The permission bits to restore (git's two modes for older entries)."""
        return self.perm if self.perm is not None else self.mode & PERM_BITS


@dataclass
class FolderRecord:
    """One folder of an entry: its permission bits and modification time."""

    path: str
    perm: int
    mtime_ns: int


def folder_record(path: str, st: os.stat_result) -> FolderRecord:
    """A folder as an entry records it."""
    return FolderRecord(path, st.st_mode & PERM_BITS, st.st_mtime_ns)


def same_attributes(rec: FileRecord, st_mode: int) -> bool:
    """True when a file's mode is what restoring ``rec`` gives (commit and status agree)."""
    return git_mode(st_mode) == rec.mode and st_mode & PERM_BITS == rec.permissions


def folder_changes(old: EntryMeta | None, folders: list[FolderRecord], root_perm: int) -> list[str]:
    """Folders (as ``path/``; the area as ``./``) whose permissions differ from ``old``'s.

    Entries saved before folders were recorded restore no folder modes, so
    nothing differs from them.  Folders added or removed show as their files.
    """
    if old is None or (not old.folders and old.root_perm is None):
        return []
    before = {f.path: f.perm for f in old.folders}
    out = [f"{f.path}/" for f in folders if before.get(f.path, f.perm) != f.perm]
    if old.root_perm is not None and old.root_perm != root_perm:
        out.insert(0, "./")
    return out


def _ranged(value: object, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CorruptRepository(f"entry metadata holds an impossible {what} ({str(value)[:40]})")
    return value


@dataclass
class EntryMeta:
    """The ``vml-entry.json`` document of an entry."""

    kind: str
    parent: str | None
    area: str
    area_id: str
    created: str
    message: str
    files: list[FileRecord]
    dirs: list[str] = field(default_factory=list)  # the empty folders
    vm: dict[str, object] | None = None
    stats: dict[str, int] = field(default_factory=dict)
    # Every folder's permissions and time, and the area's own permissions;
    # empty and None for entries saved before VML kept them.
    folders: list[FolderRecord] = field(default_factory=list)
    root_perm: int | None = None

    def encode(self) -> bytes:
        """The metadata blob's bytes (stable key order)."""
        doc = {"vml_entry": 1, **asdict(self)}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> EntryMeta:
        """Parse and check an entry's metadata blob."""
        if len(data) > MAX_META_BYTES:
            raise HostileRepository("entry metadata is implausibly large")
        try:
            doc = json.loads(data)
            if doc.get("vml_entry") != 1:
                raise newer_or_unknown("entry metadata", doc.get("vml_entry"), 1)
            files = [
                FileRecord(
                    path=check_relpath(str(f["path"])),
                    kind=str(f["kind"]),
                    mode=int(f["mode"]),
                    mtime_ns=_ranged(f["mtime_ns"], *MTIME_RANGE, "modification time"),
                    size=int(f["size"]),
                    sha256=str(f["sha256"]),
                    perm=None
                    if f.get("perm") is None
                    else _ranged(f["perm"], 0, PERM_BITS, "permission"),
                )
                for f in doc["files"]
            ]
            folders = [
                FolderRecord(
                    path=check_relpath(str(d["path"])),
                    perm=_ranged(d["perm"], 0, PERM_BITS, "permission"),
                    mtime_ns=_ranged(d["mtime_ns"], *MTIME_RANGE, "modification time"),
                )
                for d in doc.get("folders", [])
            ]
            root_perm = doc.get("root_perm")
            meta = cls(
                kind=str(doc["kind"]),
                parent=doc["parent"],
                area=str(doc["area"]),
                area_id=str(doc["area_id"]),
                created=str(doc["created"]),
                message=str(doc["message"]),
                files=files,
                dirs=[check_relpath(str(d)) for d in doc.get("dirs", [])],
                vm=doc.get("vm"),
                stats={str(k): int(v) for k, v in doc.get("stats", {}).items()},
                folders=folders,
                root_perm=None
                if root_perm is None
                else _ranged(root_perm, 0, PERM_BITS, "permission"),
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            raise CorruptRepository(f"entry metadata is malformed ({e})") from None
        except RecursionError:
            raise CorruptRepository("entry metadata is nested too deeply") from None
        if meta.kind not in KINDS:
            raise CorruptRepository(f"entry has unknown kind {meta.kind!r}")
        for f in meta.files:
            if (
                f.kind not in ("small", "image")
                or f.mode not in FILE_MODES
                or f.size < 0
                or not re.fullmatch(r"[0-9a-f]{64}", f.sha256)
            ):
                raise CorruptRepository(f"entry metadata for {f.path} is malformed")
        return meta


def now_iso() -> str:
    """The current time as an ISO 8601 string in UTC."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def nested_trees(
    items: dict[str, tuple[int, bytes]], escape: bool = False
) -> tuple[Tree, list[Tree]]:
    """Build trees for ``{"a/b/c": (mode, binary id)}``; children come first.

    With ``escape``, names are stored as :func:`escape_name` gives them.
    """
    encode = escape_name if escape else os.fsencode
    root: dict[str, object] = {}
    for path, value in items.items():
        node = root
        parts = PurePosixPath(path).parts
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"{path} is both a file and a folder")
            node = child
        node[parts[-1]] = value
    made: list[Tree] = []

    def build(node: dict[str, object]) -> Tree:
        tree = Tree()
        for name, value in node.items():
            if isinstance(value, dict):
                sub = build(value)
                tree.add(encode(name), TREE_MODE, sub.id)
            else:
                assert isinstance(value, tuple)
                mode, sha = value
                tree.add(encode(name), mode, ObjectID(sha.hex().encode()))
        made.append(tree)
        return tree

    top = build(root)
    return top, made


def store_trees(
    add: Callable[[Tree], object], items: dict[str, tuple[int, bytes]], escape: bool = False
) -> bytes:
    """Build and store the trees for ``items``; returns the top tree's id.

    Each tree goes to ``add`` children first (see :func:`nested_trees`).
    """
    top, made = nested_trees(items, escape)
    for t in made:
        add(t)
    return bytes.fromhex(top.id.decode())


def make_commit(
    tree_id: bytes,
    parent: bytes | None,
    message: str,
    trailers: Iterable[tuple[str, str]],
    when: int | None = None,
) -> Commit:
    """A commit object for an entry (ids are binary)."""
    c = Commit()
    c.tree = ObjectID(tree_id.hex().encode())
    c.parents = [ObjectID(parent.hex().encode())] if parent else []
    c.author = c.committer = AUTHOR
    t = int(time.time()) if when is None else when
    c.author_time = c.commit_time = t
    offset = -time.timezone if time.localtime(t).tm_isdst == 0 else -time.altzone
    c.author_timezone = c.commit_timezone = offset
    c.encoding = b"UTF-8"
    body = message.strip() or "VML entry"
    lines = "\n".join(f"{k}: {v}" for k, v in trailers)
    # Undecodable bytes (a path, an argument) are written as escapes: a
    # commit message says it is UTF-8 and must be.
    c.message = f"{body}\n\n{lines}\n".encode("utf-8", "backslashreplace")
    return c


def parse_trailers(message: bytes) -> dict[str, str]:
    """The ``VML-*`` trailers of a commit message."""
    out: dict[str, str] = {}
    for line in message.decode("utf-8", "replace").splitlines():
        m = re.match(r"^(VML-[A-Za-z-]+): (.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def message_body(message: bytes) -> str:
    """The user's part of a commit message (without trailers)."""
    lines = message.decode("utf-8", "replace").rstrip("\n").splitlines()
    while lines and (re.match(r"^VML-[A-Za-z-]+: ", lines[-1]) or not lines[-1].strip()):
        lines.pop()
    return "\n".join(lines)


@dataclass
class Entry:
    """An entry read back from the repository."""

    commit: bytes  # binary id
    parent: bytes | None
    tree: bytes
    meta: EntryMeta
    message: str
    trailers: dict[str, str]
    commit_time: int

    @property
    def hex(self) -> str:
        """The commit id in hex."""
        return self.commit.hex()


ReadObject = Callable[[bytes, int], bytes]


def root_items(read: ReadObject, tree: bytes) -> dict[bytes, tuple[int, bytes]]:
    """The names of an entry's root tree."""
    return {name: (mode, sha) for name, mode, sha in parse_tree(read(tree, 2))}


def parse_commit(commit_id: bytes, raw: bytes) -> Commit:
    """A commit object from its bytes; a malformed one is :class:`CorruptRepository`."""
    try:
        c = Commit.from_raw_string(1, raw)
        assert isinstance(c, Commit)
        # Read the fields here, where a malformed header shows.
        _ = c.parents, c.tree, c.message, c.commit_time
        for p in c.parents:
            bytes.fromhex(p.decode())
        bytes.fromhex(c.tree.decode())
    except Exception as e:  # dulwich raises ObjectFormatException, ValueError, ...
        raise CorruptRepository(f"commit {commit_id.hex()} is malformed ({e})") from None
    return c


def load_entry(read: ReadObject, commit_id: bytes) -> Entry:
    """Read an entry's commit and metadata."""
    c = parse_commit(commit_id, read(commit_id, 1))
    parents = [bytes.fromhex(p.decode()) for p in c.parents]
    if len(parents) > 1:
        raise CorruptRepository(f"commit {commit_id.hex()} has several parents; not a VML entry")
    tree = bytes.fromhex(c.tree.decode())
    items = root_items(read, tree)
    meta_item = items.get(META_NAME)
    if meta_item is None or meta_item[0] != BLOB_MODE:
        raise CorruptRepository(
            f"commit {commit_id.hex()} is not a VML entry (no {META_NAME.decode()})"
        )
    meta = EntryMeta.decode(read(meta_item[1], 3))
    return Entry(
        commit=commit_id,
        parent=parents[0] if parents else None,
        tree=tree,
        meta=meta,
        message=message_body(c.message),
        trailers=parse_trailers(c.message),
        commit_time=c.commit_time,
    )


def small_blob(read: ReadObject, entry: Entry, path: str) -> bytes | None:
    """The blob holding small file ``path`` of ``entry``, or None if absent or not a file."""
    found = find_in_entry(read, entry.tree, FILES_NAME, path)
    if found is None or found[0] not in FILE_MODES:
        return None
    return found[1]


def names_escaped(items: dict[bytes, tuple[int, bytes]]) -> bool:
    """Whether an entry's root tree items say its names are escaped."""
    return NAMES_NAME in items


def find_in_entry(
    read: ReadObject, root_tree: bytes, top: bytes, path: str
) -> tuple[int, bytes] | None:
    """Find file ``path`` below ``top`` (files/ or images/) of an entry's root tree.

    Names are escaped or not as the entry's root says; returns
    ``(mode, binary id)`` or None.
    """
    items = root_items(read, root_tree)
    found = items.get(top)
    if found is None:
        return None
    encode = escape_name if names_escaped(items) else os.fsencode
    return _walk(read, found, [encode(p) for p in path.split("/")])


def lookup_path(read: ReadObject, tree: bytes, path: str) -> tuple[int, bytes] | None:
    """Find ``path`` below ``tree``, its names as stored; returns ``(mode, binary id)`` or None."""
    return _walk(read, (TREE_MODE, tree), [os.fsencode(p) for p in path.split("/")])


def _walk(
    read: ReadObject, start: tuple[int, bytes], names: list[bytes]
) -> tuple[int, bytes] | None:
    mode, sha = start
    for part in names:
        if mode != TREE_MODE:
            return None
        found = None
        for name, m, s in parse_tree(read(sha, 2)):
            if name == part:
                found = (m, s)
                break
        if found is None:
            return None
        mode, sha = found
    return mode, sha
