"""Routing policies: which of the workers that can take a request gets it.

Admission (does the worker have room: sequence slots and KV blocks) is ``admission.Dispatcher``'s business;
a routing policy only ranks the workers that passed it. Policies are chosen by name in the service config
(``routing_policy:``), through the same tiny registry as the engine's policies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from policies.registry import Registry

if TYPE_CHECKING:
    from actors.admission import WorkerState
    from actors.protocol import QueuedRequest

ROUTING_POLICIES: Registry["RoutingPolicy"] = Registry("routing")


class RoutingPolicy:
    name: str

    def choose(self, req: "QueuedRequest", workers: Sequence["WorkerState"]) -> "WorkerState | None":
        """Pick one of ``workers`` (all of which have room for ``req``), or None to keep it queued."""
        raise NotImplementedError


@ROUTING_POLICIES.register("least_loaded")
class LeastLoadedPolicy(RoutingPolicy):
    """Fewest tokens in flight (prompt + output budget of the requests the worker holds), then most free blocks.

    Tokens in flight rather than request counts, because one 1,000-token request costs a worker as much KV and
    prefill as ten 100-token ones. ``affinity`` is the hook for prefix-aware routing: a subclass that knows which
    block hashes each worker caches returns how many of ``req.prefix_hashes`` it holds, and that outranks load,
    within ``max_imbalance_tokens`` of the least loaded worker so that a hot prefix cannot pile everything onto
    one replica.
    """

    def __init__(self, max_imbalance_tokens: int = 8192):
        self.max_imbalance_tokens = max_imbalance_tokens

    def affinity(self, req: "QueuedRequest", worker: "WorkerState") -> int:
        return 0

    def choose(self, req, workers):
        if not workers:
            return None
        least = min(w.load_tokens for w in workers)
        near = [w for w in workers if w.load_tokens - least <= self.max_imbalance_tokens]
        return min(near, key=lambda w: (-self.affinity(req, w), w.load_tokens, -w.free_blocks, w.worker_id))
