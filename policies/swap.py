"""Swap policies: when a swapped-out request is brought back into the device pool.

Swapped requests come back before any new request is admitted (they were running already), oldest first.
"""

from __future__ import annotations

from gpt2serve.engine.kv_manager import KVCacheManager
from gpt2serve.engine.request import Request
from gpt2serve.policies.registry import Registry

SWAP_POLICIES: Registry["SwapPolicy"] = Registry("swap")


class SwapPolicy:
    name: str

    def order(self, swapped: list[Request]) -> list[Request]:
        return sorted(swapped, key=lambda r: (r.priority, r.arrival_time, r.arrival_seq))

    def should_swap_in(self, req: Request, kv: KVCacheManager) -> bool:
        raise NotImplementedError


@SWAP_POLICIES.register("eager")
class EagerSwapIn(SwapPolicy):
    """Back in as soon as its blocks fit."""

    def should_swap_in(self, req, kv):
        return len(kv.cpu_tables[req.request_id]) <= kv.pool.num_free


@SWAP_POLICIES.register("watermark")
class WatermarkSwapIn(SwapPolicy):
    """Back in only if a ``watermark`` fraction of the pool stays free afterwards, so that the running requests
    have room to grow and the request is not swapped straight out again."""

    def __init__(self, watermark: float = 0.05):
        self.watermark = watermark

    def should_swap_in(self, req, kv):
        headroom = int(self.watermark * kv.pool.num_blocks)
        return len(kv.cpu_tables[req.request_id]) + headroom <= kv.pool.num_free
