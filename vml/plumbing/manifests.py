"""Image manifests and their block maps (fan-out trees).

Each large file ("image") of an entry is a tree ``images/<path>/`` holding:

- ``manifest``: a small JSON blob (size, whole-file SHA-256, block and page
  size, whether this layer is a base, and the block ranges that became zero);
- ``checks``: for every block of the file as this entry has it (zero blocks
  included), its git blob id and its xxh3-128 (36 bytes per block), so a
  restore checks each block it builds with the xxh3 it computes anyway for
  the area cache and takes its id from here, rather than hashing every
  object again with SHA-1 (entries written before it was introduced lack
  it; they are checked by object id);
- ``sources``: a tree naming (as ``<40 hex id>``) every blob the layer's
  version-3 page deltas take reference pages from, so git reaches them; a
  layer that has it says ``"vml_manifest": 2``;
- ``blocks/<a>/<b>/<c>``: whole blocks, and ``blocks/<a>/<b>/<c>.d``: page
  deltas, where block number ``n`` splits into ``a = n >> 16`` (4 hex digits),
  ``b = (n >> 8) & 0xff`` and ``c = n & 0xff`` (2 hex digits each).  A flat
  tree of 100k names would be parsed whole on every look-up; this one has at
  most 256 names below the top level for files up to 16M blocks.

A block absent from a layer is inherited from the parent entry, unless the
layer is a base (``"base": true``: every full entry, and a file new in a
partial entry), where an absent block is zero.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import xxhash
from dulwich.objects import ObjectID, Tree

from vml.errors import CorruptRepository, HostileRepository, newer_or_unknown

MANIFEST_NAME = b"manifest"
BLOCKS_NAME = b"blocks"
CHECKS_NAME = b"checks"
SOURCES_NAME = b"sources"
# The newest manifest version this VML reads; 2: the layer has a ``sources`` tree.
MANIFEST_VERSION = 2
_SOURCE = re.compile(rb"^[0-9a-f]{40}$")
# Checks of the blocks holding data only (others are zero); what saves write now.
SPARSE_CHECKS_NAME = b"sparse-checks"
CHECK_SIZE = 36  # one block's check: its git blob id (20 bytes), then its xxh3-128 (16)
CHECK_ID = 20
SPARSE_CHECK_SIZE = 4 + CHECK_SIZE  # the block's number (u32, big-endian), then its check
TREE_MODE = 0o040000
BLOB_MODE = 0o100644
# Far beyond any disk image, small enough that a hostile manifest cannot make
# us plan for more blocks than memory holds.
MAX_IMAGE_SIZE = 1 << 46  # 64 TiB
# Resolving an image keeps one recipe per block: bound the count a manifest
# may claim (2 TiB at 64 KiB blocks, 32 TiB at the default 1 MiB).
MAX_BLOCKS = 1 << 25
_LEAF = re.compile(rb"^([0-9a-f]{2})(\.d|\.r)?$")
_MID = re.compile(rb"^[0-9a-f]{2}$")
_TOP = re.compile(rb"^[0-9a-f]{4}$")


@dataclass
class Manifest:
    """One image's manifest in one entry."""

    size: int
    sha256: str
    block_size: int
    page_size: int
    base: bool
    zero: list[tuple[int, int]] = field(default_factory=list)  # [start, end) block ranges
    # 1, or 2 for a layer with a ``sources`` tree (version-3 page deltas): an
    # older VML refuses it as newer rather than miss the blobs it references.
    version: int = 1

    @property
    def nblocks(self) -> int:
        """Number of blocks the file spans."""
        return (self.size + self.block_size - 1) // self.block_size

    def block_length(self, n: int) -> int:
        """Length of block ``n`` (the last one may be short)."""
        return min(self.block_size, self.size - n * self.block_size)

    def zero_blocks(self) -> Iterator[int]:
        """Every block number listed as having become zero."""
        for a, b in self.zero:
            yield from range(a, b)

    def encode(self) -> bytes:
        """The manifest blob's bytes."""
        doc = {
            "vml_manifest": self.version,
            "size": self.size,
            "sha256": self.sha256,
            "block_size": self.block_size,
            "page_size": self.page_size,
            "base": self.base,
            "zero": [[a, b] for a, b in self.zero],
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Parse and check a manifest blob."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise CorruptRepository("image manifest is not valid JSON") from None
        if not isinstance(doc, dict):
            raise CorruptRepository("image manifest has an unknown format")
        version = doc.get("vml_manifest")
        if type(version) is not int or version not in (1, 2):
            raise newer_or_unknown("image manifest", version, MANIFEST_VERSION)
        try:
            size = doc["size"]
            bs = doc["block_size"]
            ps = doc["page_size"]
            sha = doc["sha256"]
            base = doc["base"]
            zero_raw = doc["zero"]
        except KeyError as e:
            raise CorruptRepository(f"image manifest lacks {e}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, bs, ps)):
            raise CorruptRepository("image manifest has non-integer sizes")
        if size < 0 or size > MAX_IMAGE_SIZE:
            raise HostileRepository(f"image manifest claims a file of {size} bytes")
        if bs < 4096 or bs > (64 << 20) or bs & (bs - 1) or ps < 512 or ps > bs or ps & (ps - 1):
            raise HostileRepository("image manifest has an impossible block or page size")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise CorruptRepository("image manifest has a bad sha256")
        if not isinstance(base, bool) or not isinstance(zero_raw, list):
            raise CorruptRepository("image manifest is malformed")
        m = cls(size, sha, bs, ps, base, version=version)
        nb = m.nblocks
        if nb > MAX_BLOCKS:
            raise HostileRepository(
                f"image manifest claims {nb} blocks of {bs} bytes; at most {MAX_BLOCKS} are supported"
            )
        prev = 0
        for item in zero_raw:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(v, int) for v in item)
                or not prev <= item[0] < item[1] <= nb
            ):
                raise HostileRepository("image manifest has a bad zero range")
            prev = item[1]
            m.zero.append((item[0], item[1]))
        return m


_ZERO_CHECKS: dict[int, tuple[bytes, bytes]] = {}


def zero_check(length: int) -> tuple[bytes, bytes]:
    """The check (git blob id, xxh3-128) of ``length`` zero bytes."""
    c = _ZERO_CHECKS.get(length)
    if c is None:
        z = bytes(length)
        blob = hashlib.sha1(b"blob %d\0" % length + z).digest()
        c = _ZERO_CHECKS[length] = (blob, bytes(xxhash.xxh3_128_digest(z)))
    return c


class BlockChecks:
    """Every block's check (git blob id, xxh3-128) of one image in one entry.

    Two encodings: ``checks`` lists all blocks, 36 bytes each, zero blocks
    included; ``sparse-checks`` lists only blocks that are not all zero,
    each as its number (u32, big-endian) and its check, in increasing order:
    an unlisted block is zero, so a 1 TiB image holding 4 MiB has 4 entries,
    not a million.
    """

    def __init__(self, manifest: Manifest, data: bytes, sparse: bool) -> None:
        self.manifest = manifest
        self.data = data
        self.sparse = sparse
        self.numbers = array("I")
        if not sparse:
            if len(data) != manifest.nblocks * CHECK_SIZE:
                raise CorruptRepository("an image has checks for the wrong number of blocks")
            return
        if len(data) % SPARSE_CHECK_SIZE:
            raise CorruptRepository("an image's sparse checks have a bad length")
        prev = -1
        for at in range(0, len(data), SPARSE_CHECK_SIZE):
            n = int.from_bytes(data[at : at + 4], "big")
            if n <= prev or n >= manifest.nblocks:
                raise CorruptRepository("an image's sparse checks are out of order")
            self.numbers.append(n)
            prev = n

    @property
    def name(self) -> bytes:
        """The name of its blob in the image's tree."""
        return SPARSE_CHECKS_NAME if self.sparse else CHECKS_NAME

    def get(self, n: int) -> tuple[bytes, bytes]:
        """Block ``n``'s ``(blob id, xxh3-128)``."""
        if not self.sparse:
            at = n * CHECK_SIZE
            return self.data[at : at + CHECK_ID], self.data[at + CHECK_ID : at + CHECK_SIZE]
        i = bisect_left(self.numbers, n)
        if i < len(self.numbers) and self.numbers[i] == n:
            at = i * SPARSE_CHECK_SIZE + 4
            return self.data[at : at + CHECK_ID], self.data[at + CHECK_ID : at + CHECK_SIZE]
        return zero_check(self.manifest.block_length(n))

    @classmethod
    def from_blocks(
        cls, manifest: Manifest, blocks: Iterable[tuple[int, bytes, bytes]]
    ) -> BlockChecks:
        """Sparse checks from ``(block, blob id, xxh3-128)`` of the blocks holding data, in order."""
        out = bytearray()
        for n, blob, xxh in blocks:
            out += n.to_bytes(4, "big")
            out += blob
            out += xxh
        return cls(manifest, bytes(out), sparse=True)


def ranges(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """Collapse increasing block numbers into ``[start, end)`` ranges."""
    out: list[tuple[int, int]] = []
    for n in numbers:
        if out and out[-1][1] == n:
            out[-1] = (out[-1][0], n + 1)
        else:
            out.append((n, n + 1))
    return out


BlockRef = tuple[bool, bytes]  # (is_delta, binary blob id)

# An anchored block's tree holds at most one whole block and this many deltas.
MAX_ANCHORED_DELTAS = 64
_DELTA_NAME = re.compile(rb"^d([0-9]{2})$")


@dataclass(frozen=True)
class Anchored:
    """A block built from objects this layer names itself, whatever the parent holds.

    Written by ``vml rm``/``convert`` (and by a save only as a block built on
    zeros with one version-3 delta, see images.py): the recipe a block
    already had (a whole block, or zeros, then page deltas oldest first),
    named in a small tree ``<c>.r/`` (``base``, ``d01``, ``d02``, ...), so a
    layer can be moved onto another parent without building or storing any
    image data, and git still reaches every object it needs.
    """

    base: bytes | None
    deltas: tuple[bytes, ...]

    def ids(self) -> tuple[bytes, ...]:
        """Every object the block needs."""
        return ((self.base,) if self.base is not None else ()) + self.deltas


LayerBlock = BlockRef | Anchored


def layer_block_ids(block: LayerBlock) -> tuple[bytes, ...]:
    """The objects one block-map entry names."""
    return block.ids() if isinstance(block, Anchored) else (block[1],)


def _anchored_tree(block: Anchored) -> Tree:
    tree = Tree()
    if block.base is not None:
        tree.add(b"base", BLOB_MODE, ObjectID(block.base.hex().encode()))
    for i, d in enumerate(block.deltas, 1):
        tree.add(b"d%02d" % i, BLOB_MODE, ObjectID(d.hex().encode()))
    return tree


def block_trees(blocks: Mapping[int, LayerBlock]) -> tuple[Tree | None, list[Tree]]:
    """Build the fan-out trees for a block map.

    Returns the ``blocks`` tree (None for an empty map) and every tree made,
    children before parents, so they can be written in order.
    """
    if not blocks:
        return None, []
    made: list[Tree] = []
    top = Tree()
    mid: Tree | None = None
    leaf: Tree | None = None
    cur_a = cur_b = -1
    for n in sorted(blocks):
        a, b, c = n >> 16, (n >> 8) & 0xFF, n & 0xFF
        if a >= 1 << 16:
            raise ValueError("file has too many blocks for the block map")
        if a != cur_a or b != cur_b:
            if leaf is not None and mid is not None:
                mid.add(b"%02x" % cur_b, TREE_MODE, leaf.id)
                made.append(leaf)
            leaf = Tree()
            if a != cur_a:
                if mid is not None:
                    top.add(b"%04x" % cur_a, TREE_MODE, mid.id)
                    made.append(mid)
                mid = Tree()
                cur_a = a
            cur_b = b
        entry = blocks[n]
        assert leaf is not None
        if isinstance(entry, Anchored):
            sub = _anchored_tree(entry)
            made.append(sub)
            leaf.add(b"%02x.r" % c, TREE_MODE, sub.id)
            continue
        is_delta, sha = entry
        leaf.add(
            b"%02x.d" % c if is_delta else b"%02x" % c, BLOB_MODE, ObjectID(sha.hex().encode())
        )
    assert leaf is not None and mid is not None
    mid.add(b"%02x" % cur_b, TREE_MODE, leaf.id)
    made.append(leaf)
    top.add(b"%04x" % cur_a, TREE_MODE, mid.id)
    made.append(mid)
    made.append(top)
    return top, made


def parse_tree(raw: bytes) -> list[tuple[bytes, int, bytes]]:
    """Parse a raw tree object into ``(name, mode, binary id)`` triples."""
    out: list[tuple[bytes, int, bytes]] = []
    pos = 0
    n = len(raw)
    while pos < n:
        sp = raw.find(b" ", pos)
        nul = raw.find(b"\0", sp + 1)
        if sp < 0 or nul < 0 or nul + 21 > n:
            raise CorruptRepository("malformed tree object")
        try:
            mode = int(raw[pos:sp], 8)
        except ValueError:
            raise CorruptRepository("malformed tree object") from None
        name = raw[sp + 1 : nul]
        out.append((name, mode, raw[nul + 1 : nul + 21]))
        pos = nul + 21
    return out


def _read_anchored(read_tree: Callable[[bytes], bytes], sha: bytes) -> Anchored:
    base: bytes | None = None
    deltas: dict[int, bytes] = {}
    for name, mode, obj in parse_tree(read_tree(sha)):
        m = _DELTA_NAME.match(name)
        if mode != BLOB_MODE or (name != b"base" and m is None):
            raise HostileRepository(f"unexpected name {name!r} in an anchored block")
        if m is None:
            base = obj
        else:
            deltas[int(m.group(1))] = obj
    if sorted(deltas) != list(range(1, len(deltas) + 1)) or len(deltas) > MAX_ANCHORED_DELTAS:
        raise HostileRepository("an anchored block names its deltas out of order")
    if base is None and not deltas:
        raise HostileRepository("an anchored block names nothing")
    return Anchored(base, tuple(deltas[i] for i in sorted(deltas)))


def read_block_map(
    read_tree: Callable[[bytes], bytes], blocks_tree: bytes, nblocks: int
) -> dict[int, LayerBlock]:
    """Read a ``blocks`` fan-out tree back into a block map, checking every name."""
    out: dict[int, LayerBlock] = {}
    for a_name, a_mode, a_sha in parse_tree(read_tree(blocks_tree)):
        if a_mode != TREE_MODE or not _TOP.match(a_name):
            raise HostileRepository(f"unexpected name {a_name!r} in a block map")
        a = int(a_name, 16)
        for b_name, b_mode, b_sha in parse_tree(read_tree(a_sha)):
            if b_mode != TREE_MODE or not _MID.match(b_name):
                raise HostileRepository(f"unexpected name {b_name!r} in a block map")
            b = int(b_name, 16)
            for c_name, c_mode, c_sha in parse_tree(read_tree(b_sha)):
                m = _LEAF.match(c_name)
                anchored = m is not None and m.group(2) == b".r"
                if m is None or c_mode != (TREE_MODE if anchored else BLOB_MODE):
                    raise HostileRepository(f"unexpected name {c_name!r} in a block map")
                n = (a << 16) | (b << 8) | int(m.group(1), 16)
                if n >= nblocks:
                    raise HostileRepository(f"block {n} lies beyond the end of its file")
                if n in out:
                    raise HostileRepository(f"block {n} is named twice in a block map")
                if anchored:
                    out[n] = _read_anchored(read_tree, c_sha)
                else:
                    out[n] = (m.group(2) is not None, c_sha)
    return out


def sources_tree(sources: Iterable[bytes]) -> Tree:
    """The ``sources`` tree naming every blob a layer's page deltas reference."""
    tree = Tree()
    for sha in sorted(set(sources)):
        tree.add(sha.hex().encode(), BLOB_MODE, ObjectID(sha.hex().encode()))
    return tree


def read_sources(read_tree: Callable[[bytes], bytes], sha: bytes) -> frozenset[bytes]:
    """The blob ids a ``sources`` tree names, every name checked against its id."""
    out = set()
    for name, mode, obj in parse_tree(read_tree(sha)):
        if mode != BLOB_MODE or not _SOURCE.match(name) or bytes.fromhex(name.decode()) != obj:
            raise HostileRepository(f"unexpected name {name[:64]!r} in an image's sources")
        out.add(obj)
    if not out:
        raise HostileRepository("an image's sources name nothing")
    return frozenset(out)
