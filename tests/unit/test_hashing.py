"""Chained block hashes: stable across processes, prefix-chained, salted per tenant."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deployments.routing.hashing import block_hashes

TOKENS = list(range(1000, 1100))


def test_only_full_blocks_are_hashed() -> None:
    assert len(block_hashes(TOKENS, 16)) == 100 // 16
    assert block_hashes(TOKENS[:15], 16) == []


def test_chain_covers_the_whole_prefix() -> None:
    base = block_hashes(TOKENS, 16)
    changed_first = block_hashes([0, *TOKENS[1:]], 16)
    # One changed token in block 0 changes every later hash: a block's hash names its prefix.
    assert all(a != b for a, b in zip(base, changed_first, strict=True))
    changed_last = TOKENS[:]
    changed_last[95] = 0
    assert block_hashes(changed_last, 16)[:5] == base[:5]
    assert block_hashes(changed_last, 16)[5] != base[5]


def test_same_block_at_another_position_hashes_differently() -> None:
    block = list(range(16))
    hashes = block_hashes(block * 2, 16)
    assert hashes[0] != hashes[1]


def test_salt_separates_tenants() -> None:
    assert block_hashes(TOKENS, 16, salt="a") != block_hashes(TOKENS, 16, salt="b")
    assert block_hashes(TOKENS, 16, salt="a") == block_hashes(TOKENS, 16, salt="a")
    assert set(block_hashes(TOKENS, 16)).isdisjoint(block_hashes(TOKENS, 16, salt="a"))


def test_stable_across_processes() -> None:
    # A fresh interpreter with another hash seed must compute the same values (no `hash()`).
    code = (
        "from deployments.routing.hashing import block_hashes;"
        "print(block_hashes(list(range(1000, 1100)), 16, 't'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout
    assert out.strip() == str(block_hashes(TOKENS, 16, "t"))


def test_pinned_value() -> None:
    # Pins the wire format: routers and engines of different versions must agree on hashes.
    assert block_hashes([1, 2, 3, 4], 2) == [5928875396629409309, 14234500857859589828]
    assert block_hashes([1, 2, 3, 4], 2, "t") == [1222447208652658140, 5982611795105322258]


def test_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes(TOKENS, 0)
