"""Chained block hashes over prompt token ids: the key the router and the engines share.

Block i's hash covers every token from the start of the prompt to the end of block i (it chains the
previous block's hash), so equal hashes mean equal prefixes. Only full blocks are hashed, as vLLM
caches only full blocks. The hash is blake2b, not Python's `hash`, so it is the same in every
process and on every machine (PYTHONHASHSEED does not matter).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

_HASH_BYTES = 8
_ROOT = b"inference-cluster/v1"


def _root_digest(salt: str | None) -> bytes:
    # A per-tenant salt changes every hash of the chain, so two tenants with the same prompt never
    # share (or can observe through timing) each other's cache blocks.
    seed = _ROOT if salt is None else _ROOT + b"\x00salt\x00" + salt.encode()
    return hashlib.blake2b(seed, digest_size=_HASH_BYTES).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> list[int]:
    """Hashes of every full block of `token_ids`, in order; a trailing partial block is skipped."""
    return chain_hashes(None, token_ids, block_size, salt)


def chain_hashes(
    parent: int | None, token_ids: Sequence[int], block_size: int, salt: str | None = None
) -> list[int]:
    """Hashes of the full blocks of `token_ids`, continuing the chain after block hash `parent`.

    `parent=None` starts a chain at the root, where `salt` goes in. A parent hash already carries
    its chain's salt, so giving both is a mistake. Continuing after the hash of a prefix's last
    block yields exactly the hashes `block_hashes` gives the rest of that prefix's blocks.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if parent is not None and salt is not None:
        raise ValueError("a salt only applies at the root of a chain; the parent carries it")
    packed = array("I", token_ids).tobytes()  # uint32: every vocabulary fits
    stride = block_size * 4
    digest = _root_digest(salt) if parent is None else parent.to_bytes(_HASH_BYTES, "little")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        chunk = packed[start * 4 : start * 4 + stride]
        digest = hashlib.blake2b(digest + chunk, digest_size=_HASH_BYTES).digest()
        hashes.append(int.from_bytes(digest, "little"))
    return hashes
