"""Continuous batching: decide each step's work, then book its result.

``schedule()`` and ``update_from_output()`` are two of the three calls of a step (the model runner's
``execute()`` sits between them). Which request waits first, who is preempted and when swapped requests come
back are policy objects chosen by name; this file holds only the mechanism.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.kv_manager import KVCacheManager
from gpt2serve.engine.outputs import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                                      SchedulerOutput)
from gpt2serve.engine.request import Request, RequestStatus
from gpt2serve.policies.preemption import PREEMPTION_POLICIES
from gpt2serve.policies.scheduling import SCHEDULING_POLICIES
from gpt2serve.policies.swap import SWAP_POLICIES


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.kv = kv
        self.clock = clock
        self.policy = SCHEDULING_POLICIES.build(config.scheduling_policy, **config.scheduling_policy_args)
        self.preemption = PREEMPTION_POLICIES.build(config.preemption_policy)
        self.swap_policy = SWAP_POLICIES.build(config.swap_policy, **config.swap_policy_args)
        self.requests: dict[str, Request] = {}
        self.groups: dict[str, list[str]] = {}  # external id → its sequences' ids
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self._sent_to_runner: set[str] = set()
        self._finished_since_last_step: set[str] = set()
        self.counters: Counter[str] = Counter()  # preemptions_recompute, preemptions_swap, swap_in, ...

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.groups.setdefault(req.external_id, []).append(req.request_id)
        self.waiting.append(req)

    def abort(self, external_id: str) -> list[Request]:
        aborted = []
        for req_id in list(self.groups.get(external_id, [])):
            req = self.requests.get(req_id)
            if req is not None and not req.status.finished:
                self._finish(req, RequestStatus.FINISHED_ABORTED)
                aborted.append(req)
        return aborted

    def finish(self, req_id: str, status: RequestStatus) -> None:
        """End a sequence for a reason found outside the scheduler (a stop string)."""
        req = self.requests.get(req_id)
        if req is not None and not req.status.finished:
            self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        for queue in (self.waiting, self.running, self.swapped):
            if req in queue:
                queue.remove(req)
        req.status = status
        req.samples_to_fork = 0
        req.metrics.finished_time = self.clock()
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        group = self.groups.get(req.external_id, [])
        if req.request_id in group:
            group.remove(req.request_id)
        if not group:
            self.groups.pop(req.external_id, None)
        self._forget(req)

    def _forget(self, req: Request) -> None:
        """The runner must drop this sequence's state before the next step."""
        if req.request_id in self._sent_to_runner:
            self._sent_to_runner.discard(req.request_id)
            self._finished_since_last_step.add(req.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        # Every request has num_computed_tokens (tokens whose K/V are in the pool) and num_tokens (prompt +
        # output). A step gives each request up to num_tokens - num_computed_tokens tokens of the budget: a
        # prefill, a chunk of one, a recompute after preemption and a decode are all the same "catch up".
        # Running requests go first; only a step that preempted nobody brings swapped requests back, and only
        # once none is left swapped out are waiting ones admitted.
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        spec_tokens: dict[str, list[int]] = {}
        new_blocks: dict[str, list[int]] = {}
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []
        preempted = False
        now = self.clock()

        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            n = self._num_new_tokens(req, budget)
            spec = self._spec_tokens(req, budget - n) if req.spec_token_ids else None
            if spec:
                n += len(spec)
            while (blocks := self.kv.allocate(req, n)) is None:
                victim = self.preemption.choose_victim(self.running)
                budget += scheduled.pop(victim.request_id, 0)
                new_blocks.pop(victim.request_id, None)
                spec_tokens.pop(victim.request_id, None)
                if self.running.index(victim) < idx:
                    idx -= 1
                swap_out += self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = n
                new_blocks[req.request_id] = blocks
                if spec:
                    spec_tokens[req.request_id] = spec
                budget -= n
                idx += 1

        if not preempted:
            for req in self.swap_policy.order(self.swapped):
                if len(self.running) >= self.config.max_num_seqs or budget == 0:
                    break
                if not self.swap_policy.should_swap_in(req, self.kv) or not self._lora_fits(req):
                    break
                mapping = self.kv.swap_in(req)
                if mapping is None:
                    break
                swap_in += mapping
                self.swapped.remove(req)
                self.counters["swap_in"] += 1
                self._start_running(req, now)
                n = self._num_new_tokens(req, budget)
                blocks = self.kv.allocate(req, n)
                if blocks is None:  # its blocks are back; it grows in a later step
                    break
                scheduled[req.request_id] = n
                new_blocks[req.request_id] = blocks
                budget -= n

            # Swapped requests hold CPU memory and were running before anything waiting: while one is still
            # out, new requests would take the blocks it needs to come back.
            for req in self._waiting_in_order(now) if not self.swapped else []:
                if len(self.running) >= self.config.max_num_seqs or budget == 0:
                    break
                if not self._lora_fits(req):
                    continue  # its adapter would be one too many this step; others may still fit
                # A request starts past whatever prefix of it is cached: those tokens cost no budget.
                hit = self.kv.match_prefix(req) if req.request_id not in self.kv.tables else None
                n = self._num_new_tokens(req, budget, hit.num_tokens if hit else None)
                blocks = self.kv.allocate(req, n, hit)
                if blocks is None:
                    break
                if hit is not None:
                    req.num_computed_tokens = hit.num_tokens
                self.waiting.remove(req)
                self._start_running(req, now)
                scheduled[req.request_id] = n
                new_blocks[req.request_id] = blocks
                budget -= n

        assert budget >= 0 and sum(scheduled.values()) <= self.config.max_num_batched_tokens
        assert len(self.running) <= self.config.max_num_seqs
        return self._build_output(scheduled, new_blocks, swap_out, swap_in, spec_tokens)

    def _spec_tokens(self, req: Request, room: int) -> list[int]:
        """The proposals ``req`` verifies this step: only in decode (one token left to compute), within the step's
        budget, and never more than its remaining length allows (the step emits up to one more than it verifies)."""
        if req.num_computed_tokens != req.num_tokens - 1:
            return []
        return req.spec_token_ids[:max(min(room, req.max_total_tokens - req.num_tokens - 1), 0)]

    def _lora_fits(self, req: Request) -> bool:
        """A step applies at most ``max_loras`` adapters (the GPU slots): does ``req`` keep the running set within?"""
        if req.lora_id is None:
            return True
        active = {r.lora_id for r in self.running if r.lora_id is not None}
        return req.lora_id in active or len(active) < self.config.max_loras

    def _waiting_in_order(self, now: float) -> list[Request]:
        if self.policy.uses_prefix_match:
            # lpm orders by cached tokens, which change every step; matching a long queue each step would cost
            # more than it saves, so past that length the queue is taken in arrival order (as SGLang does).
            if len(self.waiting) > self.policy.max_queue_for_matching:
                return sorted(self.waiting, key=lambda r: (r.arrival_time, r.arrival_seq))
            for req in self.waiting:
                if req.request_id not in self.kv.tables:
                    req.num_cached_tokens = self.kv.match_prefix(req).num_tokens
        return self.policy.order(self.waiting, now)

    def _num_new_tokens(self, req: Request, budget: int, computed: int | None = None) -> int:
        n = req.num_tokens - (req.num_computed_tokens if computed is None else computed)
        if self.config.long_prefill_token_threshold is not None:
            n = min(n, self.config.long_prefill_token_threshold)
        return min(n, budget)

    def _start_running(self, req: Request, now: float) -> None:
        req.status = RequestStatus.RUNNING
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = now
        self.running.append(req)

    def _preempt(self, victim: Request) -> list[tuple[int, int]]:
        """Take ``victim`` off the device pool; return the (device, cpu) copies a swap needs."""
        self.running.remove(victim)
        victim.spec_token_ids = []
        victim.metrics.num_preemptions += 1
        self._forget(victim)
        mapping = self.kv.swap_out(victim) if self.preemption.mode == "swap" else None
        if mapping is not None:
            victim.status = RequestStatus.SWAPPED
            self.swapped.append(victim)
            self.counters["preemptions_swap"] += 1
            self.counters["swap_out"] += 1
            return mapping
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        self.waiting.append(victim)
        self.counters["preemptions_recompute"] += 1
        return []

    def _build_output(self, scheduled, new_blocks, swap_out, swap_in, spec_tokens) -> SchedulerOutput:
        new_reqs, cached_reqs = [], []
        for req_id in scheduled:
            req = self.requests[req_id]
            if req_id not in self._sent_to_runner:
                self._sent_to_runner.add(req_id)
                self.kv.take_rewritten(req)
                new_reqs.append(NewRequestData(
                    req_id=req_id, token_ids=req.all_token_ids, num_prompt_tokens=req.num_prompt_tokens,
                    params=req.params, block_ids=list(self.kv.block_ids(req)),
                    num_computed_tokens=req.num_computed_tokens, sample_index=req.sample_index, lora_id=req.lora_id,
                ))
            else:
                rewritten = self.kv.take_rewritten(req)
                cached_reqs.append(CachedRequestData(
                    req_id=req_id, new_block_ids=new_blocks[req_id], num_computed_tokens=req.num_computed_tokens,
                    block_ids=list(self.kv.block_ids(req)) if rewritten else None,
                ))
        copies, self.kv.pending_copies = self.kv.pending_copies, []
        finished, self._finished_since_last_step = self._finished_since_last_step, set()
        return SchedulerOutput(
            new_requests=new_reqs, cached_requests=cached_reqs, num_scheduled_tokens=scheduled,
            finished_req_ids=finished, blocks_to_swap_out=swap_out, blocks_to_swap_in=swap_in,
            blocks_to_copy=copies, scheduled_spec_tokens=spec_tokens,
        )

    def update_from_output(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance progress counters, append sampled tokens, finish what stopped, split off extra samples."""
        now = self.clock()
        results = []
        caching, block_size = self.kv.enable_prefix_caching, self.kv.block_size
        for req_id, n in sched.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            before = req.num_computed_tokens
            tokens = out.sampled_token_ids.get(req_id, [])
            spec = sched.scheduled_spec_tokens.get(req_id)
            if spec:
                # Verified len(spec) proposals after its last token and emitted len(tokens): the K/V of the last
                # token and of the accepted proposals stay, those of the rejected ones are dropped (the progress
                # counter moves back past them; trim frees the blocks they alone used).
                num_accepted = len(tokens) - 1
                n -= len(spec) - num_accepted
                self._count_speculation(len(spec), num_accepted)
            req.num_computed_tokens += n
            for pos, lp in out.prompt_logprobs.get(req_id, []):
                if pos == len(req.prompt_logprobs):
                    req.prompt_logprobs.append(lp)
            logprobs = out.logprobs.get(req_id, [])
            status = None
            for i, token in enumerate(tokens):
                req.output_token_ids.append(token)
                if i < len(logprobs):
                    req.output_logprobs.append(logprobs[i])
                status = req.check_stop()
                if status is not None:
                    tokens = tokens[: i + 1]
                    break
            # After the new tokens are appended: accepted proposals are computed tokens that only now join the
            # request's token ids, which the block hashes read.
            if caching and req.num_computed_tokens // block_size != before // block_size:
                self.kv.cache_full_blocks(req)  # the step filled a block (checked inline: this loop is hot)
            prompt_logprobs = None
            if tokens:
                if req.metrics.first_token_time is None:
                    req.metrics.first_token_time = now
                    if req.params.prompt_logprobs is not None and req.sample_index == 0:
                        prompt_logprobs = req.prompt_logprobs
                req.metrics.last_token_time = now
                if req.samples_to_fork:
                    self._fork_samples(req)
            if status is not None:
                self._finish(req, status)
            else:
                if spec:
                    self.kv.trim(req)
                req.spec_token_ids = out.spec_token_ids.get(req_id, [])
            if tokens or status is not None:
                results.append(EngineCoreOutput(
                    req_id, req.external_id, req.sample_index, tokens, logprobs[: len(tokens)] if logprobs else [],
                    status.value if status is not None else None, req.stop_reason, prompt_logprobs,
                ))
        return results

    def _count_speculation(self, num_proposed: int, num_accepted: int) -> None:
        c = self.counters
        c["spec_num_steps"] += 1  # verify steps, counted per request
        c["spec_num_draft_tokens"] += num_proposed
        c["spec_num_accepted_tokens"] += num_accepted
        for pos in range(num_proposed):  # acceptance rate by position: accepted_at_i / proposed_at_i
            c[f"spec_proposed_at_{pos}"] += 1
            c[f"spec_accepted_at_{pos}"] += pos < num_accepted

    def _fork_samples(self, parent: Request) -> None:
        """Split the extra samples of an n > 1 request off its first sequence once the prompt is computed.

        Each sample shares all of the prompt's blocks and recomputes only the last prompt token (writing into
        a shared block copies it first), so that it draws its own first token from the same distribution.
        """
        prompt_len = parent.num_prompt_tokens
        for i in range(1, parent.samples_to_fork + 1):
            child = Request(
                request_id=f"{parent.external_id}#{i}", external_id=parent.external_id,
                prompt_token_ids=parent.prompt_token_ids, params=parent.params,
                arrival_time=parent.arrival_time, max_total_tokens=parent.max_total_tokens,
                eos_token_id=parent.eos_token_id, priority=parent.priority, sample_index=i,
                arrival_seq=parent.arrival_seq, lora_id=parent.lora_id,
            )
            # The parent's table covers exactly the prompt here: it has not yet been given room for its token.
            assert self.kv.blocks_for(prompt_len) == len(self.kv.block_ids(parent))
            self.kv.fork(parent, child)
            child.num_computed_tokens = prompt_len - 1
            self.add_request(child)
        parent.samples_to_fork = 0

    # ------------------------------------------------------------------ observability
    def stats(self) -> dict[str, float | int]:
        return {
            "num_running": len(self.running), "num_waiting": len(self.waiting), "num_swapped": len(self.swapped),
            "kv_usage": self.kv.usage, "num_free_blocks": self.kv.pool.num_free,
            "num_total_blocks": self.kv.pool.num_blocks, **self.kv.stats(), **self.counters,
        }
