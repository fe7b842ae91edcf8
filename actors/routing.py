"""Routing policies: which of the workers that can take a request gets it.

Admission (does the worker have room: sequence slots and KV blocks) is ``admission.Dispatcher``'s business;
a routing policy only ranks the workers that passed it. Policies are chosen by name in the service config
(``routing_policy:``, arguments in ``routing_policy_args:``), through the same tiny registry as the engine's
policies. A policy object belongs to one ``Dispatcher`` (one scheduler replica): its state is plain Python,
touched only on that replica's event loop, and it never waits on anything.

Every decision is counted by reason (``decisions``, exported as ``router_decisions_total{reason}``):
``prefix_match`` (the worker holding the longest cached prefix got it), ``load_fallback`` (some worker held a
prefix of the prompt, but it was too busy, so load decided), ``load`` (no worker held any of it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from gpt2serve.policies.registry import Registry

if TYPE_CHECKING:
    from gpt2serve.actors.worker_state import WorkerState
    from gpt2serve.actors.protocol import QueuedRequest

ROUTING_POLICIES: Registry["RoutingPolicy"] = Registry("routing")
REASONS = ("prefix_match", "load_fallback", "load")


class RoutingPolicy:
    name: str
    # The ingress hashes prompts into ``QueuedRequest.prefix_hashes`` only for a policy that reads them.
    uses_prefix_hashes = False

    def __init__(self) -> None:
        self.decisions = dict.fromkeys(REASONS, 0)

    def choose(self, req: "QueuedRequest", workers: Sequence["WorkerState"], now: float) -> "WorkerState | None":
        """Pick one of ``workers`` (all of which have room for ``req``), or None to keep it queued."""
        raise NotImplementedError

    def routed(self, req: "QueuedRequest", worker: "WorkerState", now: float) -> None:
        """``req`` was just admitted to ``worker`` (after ``choose``): remember whatever helps the next choice."""


@ROUTING_POLICIES.register("least_loaded")
class LeastLoadedPolicy(RoutingPolicy):
    """Fewest tokens in flight (prompt + output budget of the requests the worker holds), then most free blocks.

    Tokens in flight rather than request counts, because one 1,000-token request costs a worker as much KV and
    prefill as ten 100-token ones. ``affinity`` is the hook for prefix-aware routing: how many of
    ``req.prefix_hashes`` the worker holds. It outranks load within ``max_imbalance_tokens`` of the least loaded
    worker, so that a hot prefix cannot pile everything onto one replica.
    """

    def __init__(self, max_imbalance_tokens: int = 8192):
        super().__init__()
        self.max_imbalance_tokens = max_imbalance_tokens

    def affinity(self, req: "QueuedRequest", worker: "WorkerState", now: float) -> int:
        return 0

    def spread(self, worker: "WorkerState") -> tuple:
        """Tie-breaker between equally matched, equally loaded workers."""
        return (-worker.free_blocks,)

    def choose(self, req, workers, now):
        if not workers:
            return None
        least = min(w.load_tokens for w in workers)
        scored = [(self.affinity(req, w, now), w) for w in workers]
        longest = max(a for a, _ in scored)
        near = [(a, w) for a, w in scored if w.load_tokens - least <= self.max_imbalance_tokens]
        match, worker = min(near, key=lambda aw: (-aw[0], aw[1].load_tokens, *self.spread(aw[1]), aw[1].worker_id))
        reason = "load" if longest == 0 else "prefix_match" if match == longest else "load_fallback"
        self.decisions[reason] += 1
        return worker


@ROUTING_POLICIES.register("prefix_aware")
class PrefixAwarePolicy(LeastLoadedPolicy):
    """The worker whose prefix cache holds the longest prefix of the prompt, by block hashes; else least loaded.

    Affinity is the number of leading ``req.prefix_hashes`` in the worker's ``PrefixIndex`` (what its engine
    reported caching, plus what was routed to it in the last ``optimistic_ttl_s``). A prompt no worker holds
    goes to the least loaded worker, and among equally loaded ones to the one caching least, as SGLang's
    cache-aware router sends unmatched text to the smallest tree: distinct prefixes spread over the replicas,
    so the service as a whole caches more of them.
    """

    uses_prefix_hashes = True

    def __init__(self, max_imbalance_tokens: int = 8192, optimistic_ttl_s: float = 30.0):
        super().__init__(max_imbalance_tokens)
        self.optimistic_ttl_s = optimistic_ttl_s

    def affinity(self, req, worker, now):
        return worker.prefix_index.match(req.prefix_hashes, now) if req.prefix_hashes else 0

    def spread(self, worker):
        return (len(worker.prefix_index), -worker.free_blocks)

    def routed(self, req, worker, now):
        if req.prefix_hashes and self.optimistic_ttl_s > 0:
            worker.prefix_index.assume(req.prefix_hashes, now + self.optimistic_ttl_s)
