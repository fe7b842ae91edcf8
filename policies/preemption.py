"""Preemption policies: when the pool runs dry mid-step, which running request gives its blocks up, and how.

``recompute`` frees the victim's blocks and later recomputes its K/V from its tokens (safe and cheap in
memory; the default). ``swap`` copies the victim's blocks to CPU swap space and copies them back later,
falling back to recompute when swap space is full.
"""

from __future__ import annotations

from gpt2serve.engine.request import Request
from gpt2serve.policies.registry import Registry

PREEMPTION_POLICIES: Registry["PreemptionPolicy"] = Registry("preemption")


class PreemptionPolicy:
    name: str
    mode: str  # "recompute" or "swap"

    def choose_victim(self, running: list[Request]) -> Request:
        """The least important running request: worst (highest) priority value, then the latest arrival."""
        return max(running, key=lambda r: (r.priority, r.arrival_time, r.arrival_seq))


@PREEMPTION_POLICIES.register("recompute")
class RecomputePreemption(PreemptionPolicy):
    mode = "recompute"


@PREEMPTION_POLICIES.register("swap")
class SwapPreemption(PreemptionPolicy):
    mode = "swap"
