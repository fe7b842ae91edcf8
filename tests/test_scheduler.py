"""Scheduler, policies and KV manager on a fake model runner: no model, hand-made outputs, invariants every step."""

import random

import pytest

from gpt2serve import EngineConfig, SamplingParams
from gpt2serve.engine.kv_manager import BlockPool, KVCacheManager
from gpt2serve.engine.outputs import ModelRunnerOutput
from gpt2serve.engine.request import Request, RequestStatus
from gpt2serve.engine.scheduler import Scheduler
from gpt2serve.policies.preemption import PREEMPTION_POLICIES
from gpt2serve.policies.scheduling import SCHEDULING_POLICIES
from gpt2serve.policies.swap import SWAP_POLICIES


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Harness:
    """A scheduler driven by a fake runner that returns token 7 for every request that caught up."""

    def __init__(self, num_blocks=64, block_size=4, num_cpu_blocks=64, **config):
        config.setdefault("max_num_batched_tokens", 32)
        config.setdefault("max_num_seqs", 8)
        self.clock = FakeClock()
        self.kv = KVCacheManager(num_blocks, block_size, num_cpu_blocks)
        self.scheduler = Scheduler(EngineConfig(**config), self.kv, clock=self.clock)
        self.first_scheduled: dict[str, int] = {}
        self.steps = 0
        self.log: list = []

    def add(self, rid, prompt_len, max_tokens=4, priority=0, arrival=None):
        req = Request(request_id=rid, external_id=rid, prompt_token_ids=[1] * prompt_len,
                      params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      arrival_time=self.clock.now if arrival is None else arrival,
                      max_total_tokens=prompt_len + max_tokens, priority=priority)
        self.scheduler.add_request(req)
        return req

    def step(self):
        s = self.scheduler
        out = s.schedule()
        assert out.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
        assert len(s.running) <= s.config.max_num_seqs
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            assert n > 0
            self.first_scheduled.setdefault(rid, self.steps)
            req = s.requests[rid]
            if req.num_computed_tokens + n == req.num_tokens:
                sampled[rid] = [7]
        s.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
        self.kv.check_invariants()
        self.log.append(out)
        self.steps += 1
        self.clock.now += 1.0
        return out

    def run(self, max_steps=1000):
        while self.scheduler.has_unfinished():
            self.step()
            assert self.steps < max_steps
        assert self.kv.all_free()

    def admission_order(self):
        return sorted(self.first_scheduled, key=lambda r: (self.first_scheduled[r], r))


# ---------------------------------------------------------------- scheduling policies
def test_fcfs_admits_in_arrival_order():
    h = Harness(max_num_seqs=1, scheduling_policy="fcfs")
    h.add("c", 4, arrival=2.0)
    h.add("a", 4, arrival=0.0)
    h.add("b", 30, arrival=1.0)  # a long one in the middle is not skipped
    h.run()
    assert h.admission_order() == ["a", "b", "c"]


def test_priority_admits_lowest_value_first_then_arrival():
    h = Harness(max_num_seqs=1, scheduling_policy="priority")
    for rid, prio, t in [("p2", 2, 0.0), ("p0-late", 0, 3.0), ("p1", 1, 1.0), ("p0", 0, 2.0)]:
        h.add(rid, 4, priority=prio, arrival=t)
    h.run()
    assert h.admission_order() == ["p0", "p0-late", "p1", "p2"]


def test_sjf_admits_shortest_prompt_first():
    h = Harness(max_num_seqs=1, scheduling_policy="sjf", scheduling_policy_args={"max_wait_s": 1000})
    for rid, n in [("long", 40), ("short", 3), ("mid", 12)]:
        h.add(rid, n, arrival=0.0)
    h.run()
    assert h.admission_order() == ["short", "mid", "long"]


@pytest.mark.parametrize("max_wait_s, starves", [(10.0, False), (1e9, True)])
def test_sjf_aging_bounds_the_wait_of_a_long_prompt(max_wait_s, starves):
    h = Harness(max_num_seqs=1, scheduling_policy="sjf", scheduling_policy_args={"max_wait_s": max_wait_s})
    h.add("long", 40, arrival=0.0)
    for i in range(40):  # a steady stream of short requests, one per step
        h.add(f"s{i:02d}", 2, max_tokens=1)
        h.step()
    if starves:
        assert "long" not in h.first_scheduled  # pure SJF: the long prompt never gets in
        h.run()
    else:
        # It ages after 10 s (10 steps) and is admitted as soon as the one running request is done.
        assert h.first_scheduled["long"] <= max_wait_s + 2
        h.run()


def test_unknown_policy_names_list_the_known_ones():
    for registry, name in [(SCHEDULING_POLICIES, "fcfs"), (PREEMPTION_POLICIES, "swap"), (SWAP_POLICIES, "eager")]:
        with pytest.raises(ValueError) as e:
            registry.build("nope")
        assert name in str(e.value)
    with pytest.raises(ValueError):
        Harness(scheduling_policy="lifo")


# ---------------------------------------------------------------- continuous batching
def test_chunked_prefill_runs_beside_decodes():
    h = Harness(max_num_batched_tokens=16, num_blocks=64)
    h.add("decoder", 4, max_tokens=30)
    h.step()  # its prompt
    h.add("long", 100, max_tokens=2)
    chunks = []
    while "long" not in h.scheduler.requests or h.scheduler.requests["long"].num_computed_tokens < 100:
        out = h.step()
        assert out.num_scheduled_tokens.get("decoder") == 1  # the decode never waits for the prefill
        chunks.append(out.num_scheduled_tokens.get("long", 0))
    assert chunks == [15] * 6 + [10]  # 100 prompt tokens over 7 steps, inside the 16-token budget
    h.run()


def test_finished_requests_leave_the_batch_and_free_their_blocks():
    h = Harness()
    h.add("a", 8, max_tokens=1)
    h.add("b", 8, max_tokens=5)
    h.step()
    assert "a" not in h.scheduler.requests and "b" in h.scheduler.requests
    assert h.kv.pool.num_free == h.kv.pool.num_blocks - 2  # b: its 8 prompt tokens; the sampled one gets a slot next step
    assert "a" in h.step().finished_req_ids
    h.run()


def test_random_workloads_keep_every_invariant():
    rng = random.Random(0)
    for policy in ["recompute", "swap"]:
        h = Harness(num_blocks=24, block_size=4, num_cpu_blocks=16, max_num_batched_tokens=20, max_num_seqs=5,
                    preemption_policy=policy, scheduling_policy="priority")
        for i in range(40):
            h.add(f"r{i}", rng.randint(1, 40), max_tokens=rng.randint(1, 30), priority=rng.randint(0, 2))
            if rng.random() < 0.5:
                h.step()
        h.run(max_steps=5000)
        assert sum(h.scheduler.counters[k] for k in ("preemptions_recompute", "preemptions_swap")) > 0


# ---------------------------------------------------------------- preemption
def test_victim_is_worst_priority_then_latest_arrival():
    policy = PREEMPTION_POLICIES.build("recompute")
    h = Harness()
    reqs = [h.add("a", 4, priority=0, arrival=0), h.add("b", 4, priority=1, arrival=1),
            h.add("c", 4, priority=1, arrival=2), h.add("d", 4, priority=0, arrival=3)]
    assert policy.choose_victim(reqs).request_id == "c"
    assert policy.choose_victim([reqs[0], reqs[3]]).request_id == "d"


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_pool_exhaustion_preempts_instead_of_failing(mode):
    # 6 blocks of 4 tokens; two requests that each grow to 12 tokens cannot both stay.
    h = Harness(num_blocks=6, block_size=4, preemption_policy=mode, max_num_batched_tokens=64)
    h.add("old", 8, max_tokens=8, arrival=0.0)
    h.add("new", 8, max_tokens=8, arrival=1.0)
    preempting_step = None
    while h.scheduler.has_unfinished():
        h.step()
        if preempting_step is None and h.scheduler.counters[f"preemptions_{mode}"]:
            preempting_step = h.steps - 1
            victim = h.scheduler.requests["new"]
            assert victim.status is (RequestStatus.SWAPPED if mode == "swap" else RequestStatus.WAITING)
            assert h.scheduler.requests["old"].status is RequestStatus.RUNNING
            # A step that had to preempt admits nothing: the victim is not scheduled again in it.
            assert "new" not in h.log[-1].num_scheduled_tokens
    assert preempting_step is not None
    assert h.kv.all_free()


def test_swap_falls_back_to_recompute_when_swap_space_is_full():
    h = Harness(num_blocks=6, block_size=4, num_cpu_blocks=1, preemption_policy="swap")
    h.add("old", 8, max_tokens=8, arrival=0.0)
    h.add("new", 8, max_tokens=8, arrival=1.0)
    h.run()
    assert h.scheduler.counters["preemptions_recompute"] > 0 and h.scheduler.counters["preemptions_swap"] == 0


def test_watermark_keeps_swapped_requests_out_until_there_is_headroom():
    kv = KVCacheManager(num_blocks=20, block_size=4, num_cpu_blocks=10)
    req = Request("r", "r", [1] * 12, SamplingParams(), 0.0, 20)
    kv.allocate(req, 12)
    assert kv.swap_out(req) is not None
    hog = Request("hog", "hog", [1] * 60, SamplingParams(), 0.0, 64)
    kv.allocate(hog, 60)  # 15 of 20 blocks: 5 free, the swapped request needs 3
    assert SWAP_POLICIES.build("eager").should_swap_in(req, kv)
    assert not SWAP_POLICIES.build("watermark", watermark=0.15).should_swap_in(req, kv)  # 3 + 3 > 5
    assert SWAP_POLICIES.build("watermark", watermark=0.1).should_swap_in(req, kv)  # 3 + 2 <= 5
    kv.free(hog)
    kv.free(req)
    assert kv.all_free()


def test_swapped_requests_come_back_before_new_ones_are_admitted():
    h = Harness(num_blocks=6, block_size=4, preemption_policy="swap", swap_policy="eager", max_num_batched_tokens=64)
    h.add("old", 8, max_tokens=8, arrival=0.0)
    h.add("new", 8, max_tokens=8, arrival=1.0)
    while not h.scheduler.counters["preemptions_swap"]:
        h.step()
    h.add("latest", 4, max_tokens=2, arrival=h.clock.now)
    h.run()
    swap_in_step = next(i for i, out in enumerate(h.log) if out.blocks_to_swap_in)
    # The pool had room for "latest" (one block) before "new" (three) could come back; it still waited.
    assert h.first_scheduled["latest"] == swap_in_step > h.first_scheduled["new"]
    assert h.scheduler.counters["swap_in"] == h.scheduler.counters["swap_out"] >= 1


# ---------------------------------------------------------------- KV manager
def test_allocate_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = Request("a", "a", [1] * 12, SamplingParams(), 0.0, 20)
    b = Request("b", "b", [1] * 8, SamplingParams(), 0.0, 20)
    assert kv.allocate(a, 12) == [0, 1, 2]
    assert kv.allocate(b, 8) is None  # needs 2, 1 free: nothing taken
    assert kv.pool.num_free == 1 and kv.block_ids(b) == []
    kv.free(a)
    kv.free(b)
    assert kv.all_free()


def test_freed_blocks_that_cache_nothing_are_reused_first():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    pool.release(blocks)
    assert pool.allocate(4) == [0, 1, 2, 3]  # nothing is cached: the freed blocks, then the untouched one


def test_fork_shares_blocks_and_copy_on_write_copies_before_writing():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = Request("p", "p", [1] * 6, SamplingParams(), 0.0, 20)
    kv.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = Request("c", "c", [1] * 6, SamplingParams(), 0.0, 20)
    kv.fork(parent, child)
    assert kv.block_ids(child) == kv.block_ids(parent) == [0, 1]
    assert kv.pool.ref_counts[:2] == [2, 2]
    child.num_computed_tokens = 5  # recompute the last prompt token: it writes into the shared block 1
    assert kv.allocate(child, 1) == []
    assert kv.pending_copies == [(1, 2)] and kv.block_ids(child) == [0, 2] and kv.take_rewritten(child)
    assert kv.pool.ref_counts[:3] == [2, 1, 1]
    assert kv.allocate(parent, 3) == [3]  # the parent's block 1 is its own again: written in place
    kv.check_invariants()
    for r in (parent, child):
        kv.free(r)
    assert kv.all_free()


def test_swapping_out_a_sharer_leaves_the_other_sharers_intact():
    kv = KVCacheManager(num_blocks=8, block_size=4, num_cpu_blocks=8)
    parent = Request("p", "p", [1] * 8, SamplingParams(), 0.0, 20)
    kv.allocate(parent, 8)
    child = Request("c", "c", [1] * 8, SamplingParams(), 0.0, 20)
    kv.fork(parent, child)
    mapping = kv.swap_out(child)
    assert [d for d, _ in mapping] == [0, 1]
    assert kv.block_ids(parent) == [0, 1] and kv.pool.ref_counts[:2] == [1, 1]
    back = kv.swap_in(child)
    assert [c for c, _ in back] == [c for _, c in mapping]
    assert set(kv.block_ids(child)).isdisjoint({0, 1})
    kv.check_invariants()
    kv.free(parent)
    kv.free(child)
    assert kv.all_free()
