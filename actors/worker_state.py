"""What the scheduler knows of one model-worker replica: its pool geometry, its last heartbeat, the reservations
routed to it and what its prefix cache holds. Admission (``admission.Dispatcher``) keeps these up to date, and the
routing policies (``routing.py``) choose among them; both import them from here, neither from the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gpt2serve.actors.prefix_index import PrefixIndex
from gpt2serve.actors.protocol import QueuedRequest


@dataclass
class Reservation:
    tokens: int
    blocks: int
    seqs: int
    routed_at: float
    adopted: bool = False  # found running on the worker (a restart), not routed by this dispatcher


@dataclass
class WorkerState:
    worker_id: str
    block_size: int
    num_total_blocks: int
    max_inflight: int
    last_seen: float
    free_blocks: int = 0  # as last reported
    unhealthy: str | None = None  # why the worker says its engine stopped making progress: route nothing there
    stats: dict[str, Any] = field(default_factory=dict)
    inflight: dict[str, Reservation] = field(default_factory=dict)
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)  # what its prefix cache holds

    @property
    def load_tokens(self) -> int:
        return sum(r.tokens for r in self.inflight.values())

    @property
    def reserved_blocks(self) -> int:
        return sum(r.blocks for r in self.inflight.values())

    @property
    def inflight_seqs(self) -> int:
        return sum(r.seqs for r in self.inflight.values())

    def blocks_for(self, req: QueuedRequest, new_tokens: int | None = None) -> int:
        """KV blocks for ``req``'s prompt and ``new_tokens`` (default: what admission reserves for it)."""
        if new_tokens is None:
            new_tokens = req.reserved_new_tokens
        # The last generated token is never fed back, so it needs no KV slot (as in the engine's own check).
        tokens = max(req.num_prompt_tokens + new_tokens - 1, 1)
        return req.n * math.ceil(tokens / self.block_size)

    def could_ever_fit(self, req: QueuedRequest, kv_overcommit: float) -> bool:
        # Judged on max_tokens: a request the pool cannot hold to its end would be preempted forever.
        return (req.n <= self.max_inflight
                and self.blocks_for(req, req.max_new_tokens) <= self.num_total_blocks * kv_overcommit)

    def fits(self, req: QueuedRequest, kv_overcommit: float) -> bool:
        return (self.inflight_seqs + req.n <= self.max_inflight
                and self.reserved_blocks + self.blocks_for(req) <= self.num_total_blocks * kv_overcommit)
