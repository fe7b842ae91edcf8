"""Scheduling policies: the order in which waiting requests are admitted.

A policy only orders; whether the head of the order fits this step's token budget and the KV pool is the
scheduler's business (admission). The scheduler admits in this order and stops at the first request that does
not fit, so that a policy's promise is not broken by smaller requests slipping past.
"""

from __future__ import annotations

from gpt2serve.engine.request import Request
from gpt2serve.policies.registry import Registry

SCHEDULING_POLICIES: Registry["SchedulingPolicy"] = Registry("scheduling")


class SchedulingPolicy:
    name: str
    uses_prefix_match = False  # whether the scheduler must fill in each waiting request's num_cached_tokens

    def sort_key(self, req: Request, now: float) -> tuple:
        raise NotImplementedError

    def order(self, waiting: list[Request], now: float) -> list[Request]:
        return sorted(waiting, key=lambda r: self.sort_key(r, now))


@SCHEDULING_POLICIES.register("fcfs")
class FcfsPolicy(SchedulingPolicy):
    """First come, first served. Promise: no request is admitted before one that arrived earlier."""

    def sort_key(self, req, now):
        return (req.arrival_time, req.arrival_seq)


@SCHEDULING_POLICIES.register("priority")
class PriorityPolicy(SchedulingPolicy):
    """Lowest ``priority`` value first (vLLM's convention), arrival order within a priority level."""

    def sort_key(self, req, now):
        return (req.priority, req.arrival_time, req.arrival_seq)


@SCHEDULING_POLICIES.register("sjf")
class ShortestJobFirstPolicy(SchedulingPolicy):
    """Fewest tokens left to prefill first, which cuts mean TTFT when short and long prompts mix.

    Pure SJF starves long prompts under a steady stream of short ones, so requests that have waited longer
    than ``max_wait_s`` jump ahead of every younger request, oldest first. Promise: a request waits at most
    ``max_wait_s`` plus the time to drain the requests that aged before it.
    """

    def __init__(self, max_wait_s: float = 5.0):
        self.max_wait_s = max_wait_s

    def sort_key(self, req, now):
        if now - req.arrival_time >= self.max_wait_s:
            return (0, req.arrival_time, req.arrival_seq)
        return (1, req.num_tokens - req.num_computed_tokens, req.arrival_time, req.arrival_seq)


@SCHEDULING_POLICIES.register("lpm")
class LongestPrefixMatchPolicy(SchedulingPolicy):
    """Most cached tokens first (SGLang's "longest prefix match"): requests that share what the cache holds run
    while it still holds it, instead of evicting it for an unrelated request and recomputing it later.

    Like ``sjf`` it would starve a request whose prefix nobody shares, so requests older than ``max_wait_s`` go
    first, oldest first. Beyond ``max_queue_for_matching`` waiting requests the scheduler skips the matching and
    takes arrival order (matching every waiting request each step would cost more than it saves).
    Promise: a request waits at most ``max_wait_s`` plus the time to drain the requests that aged before it.
    """

    uses_prefix_match = True

    def __init__(self, max_wait_s: float = 5.0, max_queue_for_matching: int = 256):
        self.max_wait_s = max_wait_s
        self.max_queue_for_matching = max_queue_for_matching

    def sort_key(self, req, now):
        if now - req.arrival_time >= self.max_wait_s:
            return (0, 0, req.arrival_time, req.arrival_seq)
        return (1, -getattr(req, "num_cached_tokens", 0), req.arrival_time, req.arrival_seq)
