"""Pluggable policies, each a small class chosen by name in the YAML config."""

from policies.preemption import PREEMPTION_POLICIES, PreemptionPolicy
from policies.scheduling import SCHEDULING_POLICIES, SchedulingPolicy
from policies.swap import SWAP_POLICIES, SwapPolicy

__all__ = [
    "PREEMPTION_POLICIES", "SCHEDULING_POLICIES", "SWAP_POLICIES",
    "PreemptionPolicy", "SchedulingPolicy", "SwapPolicy",
]
