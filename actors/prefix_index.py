"""What each worker's prefix cache holds, as the scheduler knows it: block hashes, kept up to date by events.

A worker's engine reports every full block that enters its prefix cache and every block it evicts
(``KVCacheManager.drain_cache_events``). The worker drains those events on each heartbeat, applies them to a
mirror set of its own, and sends them numbered (``CacheReport``). On the scheduler's side, ``PrefixIndex`` applies
them in order: O(events) per heartbeat, never a walk over the whole set. A numbering gap (the scheduler
restarted, a heartbeat was lost, first contact) makes the index ask for the worker's whole mirror once
(``needs_snapshot``), and ignore events until it arrives.

Besides what the worker confirmed, the index holds *optimistic* entries: hashes of requests just routed to the
worker, held for ``ttl`` seconds. A burst of requests sharing a prefix that arrives before the worker's next
heartbeat then still follows the first one (SGLang's router keeps an approximate tree of routed text for the
same reason). The worker's own events settle them: an insertion confirms a hash, an eviction removes it; an
entry that nothing settles (the request was cancelled before its prefill) expires.

The hashes are ``engine.prefix_cache.block_hashes`` of the prompt, which every process computes alike.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from gpt2serve.engine.prefix_cache import block_hashes

CacheEvent = tuple[int, bool]  # (block hash, True: cached / False: evicted)


def prompt_hashes(token_ids: Sequence[int], block_size: int, lora_id: str | None = None) -> tuple[int, ...]:
    """The chained hashes of a prompt's full blocks, as the engine keys its prefix cache."""
    return tuple(block_hashes(token_ids, block_size, extra_keys=(lora_id,) if lora_id else ()))


class PrefixIndex:
    """One worker's cached block hashes (confirmed by its events) plus optimistic entries (routed, unconfirmed)."""

    def __init__(self) -> None:
        self.confirmed: set[int] = set()
        self.optimistic: dict[int, float] = {}  # hash -> expiry time
        self._expiries: deque[tuple[float, tuple[int, ...]]] = deque()  # in routing order, so expiries ascend
        self.seq: int | None = None  # number of the last report applied
        self.needs_snapshot = False
        self.snapshots = 0  # snapshots applied (a resync counter, for the snapshot and tests)

    def __len__(self) -> int:
        return len(self.confirmed) + len(self.optimistic)

    # ------------------------------------------------------------------ reading
    def match(self, hashes: Sequence[int], now: float) -> int:
        """How many leading ``hashes`` this worker holds (or was just sent). The hashes are chained, so a match
        is a prefix: stop at the first block that is missing."""
        n = 0
        for h in hashes:
            if h not in self.confirmed and self.optimistic.get(h, -math.inf) <= now:
                break
            n += 1
        return n

    # ------------------------------------------------------------------ routing
    def assume(self, hashes: Sequence[int], until: float) -> None:
        """``hashes`` were just routed here: treat them as held until ``until``, or until events say otherwise."""
        fresh = tuple(h for h in hashes if h not in self.confirmed)
        if not fresh:
            return
        for h in fresh:
            self.optimistic[h] = until
        self._expiries.append((until, fresh))

    def expire(self, now: float) -> None:
        """Forget optimistic entries past their time (amortised O(1) per entry: oldest first)."""
        while self._expiries and self._expiries[0][0] <= now:
            until, hashes = self._expiries.popleft()
            for h in hashes:
                if self.optimistic.get(h) == until:  # not renewed by a later routing
                    del self.optimistic[h]

    # ------------------------------------------------------------------ reports
    def report(self, seq: int, events: Iterable[CacheEvent] | None = None,
               snapshot: Iterable[int] | None = None) -> None:
        """Apply report ``seq`` from the worker: events since its previous report, or its whole set."""
        if self.seq is not None and seq <= self.seq:
            return  # a late duplicate of something already applied or superseded
        if snapshot is not None:
            self.confirmed = set(snapshot)
            for h in self.confirmed & self.optimistic.keys():
                del self.optimistic[h]
            self.seq, self.needs_snapshot = seq, False
            self.snapshots += 1
            return
        if self.needs_snapshot or self.seq is None or seq != self.seq + 1:
            self.needs_snapshot = True  # a gap: these events cannot be trusted on top of what is here
            return
        for h, cached in events or ():
            if cached:
                self.confirmed.add(h)
            else:
                self.confirmed.discard(h)
            self.optimistic.pop(h, None)  # the worker's word settles a guess either way
        self.seq = seq


@dataclass
class CacheReport:
    """The worker's side: a mirror of its engine's cached hashes, and the numbered reports it sends."""

    cached: set[int] = field(default_factory=set)
    seq: int = 0
    snapshot_due: bool = True  # the first report is a snapshot: no round trip on first contact

    def next(self, events: list[CacheEvent]) -> dict:
        """Fold ``events`` into the mirror and return the heartbeat fields: the events, or a snapshot when one is
        due or would be smaller (so a report never carries more hashes than the pool has blocks)."""
        for h, cached in events:
            if cached:
                self.cached.add(h)
            else:
                self.cached.discard(h)
        self.seq += 1
        if self.snapshot_due or len(events) > len(self.cached):
            self.snapshot_due = False
            return {"cache_seq": self.seq, "cache_snapshot": list(self.cached)}
        return {"cache_seq": self.seq, "cache_events": events}
