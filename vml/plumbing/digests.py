"""Block ids and image digests: what a manifest's ``sha256`` and an image's checks are made of.

A block's id is the git blob id of its bytes (an all-zero block's, of that
many zero bytes); an image's digest is the SHA-256 of its blocks' ids in
order (docs/FORMAT.md, "Image manifests").  Saves, restores and verify
compute them the same way, zero blocks in bulk.
"""

from __future__ import annotations

import hashlib

from vml.plumbing.cache import block_hash, page_hashes
from vml.plumbing.manifests import BlockChecks, Manifest
from vml.plumbing.packreader import blob_id

_ZEROS: dict[int, bytes] = {}
_ZERO_HASHES: dict[tuple[int, int, int], tuple[bytes, bytes]] = {}


def zeros(length: int) -> bytes:
    """A shared all-zero buffer of ``length`` bytes."""
    z = _ZEROS.get(length)
    if z is None:
        z = _ZEROS[length] = bytes(length)
    return z


def zero_record(length: int, page_size: int, ppb: int) -> tuple[bytes, bytes]:
    """Cache record parts (block hash, page hashes) of an all-zero block."""
    key = (length, page_size, ppb)
    rec = _ZERO_HASHES.get(key)
    if rec is None:
        z = zeros(length)
        rec = _ZERO_HASHES[key] = (block_hash(z), page_hashes(z, page_size, ppb))
    return rec


_ZERO_DIGESTS: dict[int, bytes] = {}


def block_digest(data: bytes | None, length: int) -> bytes:
    """A block's id: the git blob id of its bytes (``None``: ``length`` zero bytes).

    Whole blocks are stored under exactly this id, so reading one back and
    checking its object id already checks its digest: no second hash pass.
    """
    if data is not None:
        return blob_id(data)
    d = _ZERO_DIGESTS.get(length)
    if d is None:
        d = _ZERO_DIGESTS[length] = blob_id(zeros(length))
    return d


class Digests:
    """An image's digest, fed in block order (zero blocks in bulk, at C speed),
    and the checks of its blocks that hold data (sparse checks)."""

    _CHUNK = 1 << 16

    def __init__(self, size: int, block_size: int) -> None:
        self.size = size
        self.bs = block_size
        self.hash = hashlib.sha256()
        self.found: list[tuple[int, bytes, bytes]] = []
        self.next = 0
        self.full = size // block_size

    def zeros_until(self, end: int) -> None:
        """Blocks from the last one fed up to ``end`` are all zero."""
        if end <= self.next:
            return
        k = min(end, self.full) - self.next
        if k > 0:
            zid = block_digest(None, self.bs)
            while k > 0:
                c = min(k, self._CHUNK)
                self.hash.update(zid * c)
                k -= c
        if end > self.full >= self.next:  # the short last block
            self.hash.update(block_digest(None, self.size - self.full * self.bs))
        self.next = end

    def block(self, n: int, digest: bytes, bhash: bytes, zero: bool = False) -> None:
        """Block ``n``'s id and xxh3-128 (blocks before it not fed yet are zero)."""
        self.zeros_until(n)
        self.hash.update(digest)
        if not zero:
            self.found.append((n, digest, bhash))
        self.next = n + 1

    def checks(self, manifest: Manifest) -> BlockChecks:
        """The sparse checks of the blocks fed as holding data."""
        return BlockChecks.from_blocks(manifest, self.found)
