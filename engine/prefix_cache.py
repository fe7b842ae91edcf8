"""Block hashes for prefix caching: a chain over full KV blocks, the same in every process.

A full block's K/V depend on every token before it, not only its own, so its key chains the parent block's hash
with its own token ids and the *extra keys* (anything else that changes the K/V, such as a LoRA adapter id).
Two prompts share the hash of block i exactly when they agree on tokens 0 .. (i+1)·block_size - 1 and on the
extra keys, barring a 64-bit collision, which the KV manager guards against by comparing the tokens on a hit.

The hash is blake2b, not Python's ``hash``: strings hash differently in every process (PYTHONHASHSEED), and the
ingress, the scheduler and every worker replica must agree on these values for prefix-aware routing.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

ROOT_HASH = 0  # the "parent" of a sequence's first block


def extra_keys_bytes(extra_keys: tuple) -> bytes:
    return repr(extra_keys).encode() if extra_keys else b""


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as the bytes that hashes and collision checks read (8 per token); convert once, slice per block."""
    return array("q", token_ids).tobytes()


def hash_block(parent: int, block: bytes, extra: bytes = b"") -> int:
    """The chained hash of one full block: (parent hash, its tokens' bytes, extra keys) → unsigned 64-bit int."""
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(block)
    if extra:
        h.update(extra)
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, extra_keys: tuple = (),
                 known: list[int] | None = None) -> list[int]:
    """Hashes of every full block of ``token_ids``; ``known`` (a prefix of the answer) is extended, not redone."""
    hashes = list(known) if known else []
    extra = extra_keys_bytes(extra_keys)
    parent = hashes[-1] if hashes else ROOT_HASH
    first, end = len(hashes), len(token_ids) // block_size
    if end <= first:
        return hashes
    data = token_bytes(token_ids[first * block_size:end * block_size])
    step = 8 * block_size
    for off in range(0, len(data), step):
        parent = hash_block(parent, data[off:off + step], extra)
        hashes.append(parent)
    return hashes
