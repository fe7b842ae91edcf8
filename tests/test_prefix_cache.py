"""Prefix caching: the hash chain, the block index of the KV manager, and the engine with caching on vs off."""

import os
import random
import subprocess
import sys

import pytest

from gpt2serve import SamplingParams
from gpt2serve.engine.kv_manager import BlockPool, KVCacheManager
from gpt2serve.engine.prefix_cache import block_hashes
from gpt2serve.engine.request import Request
from gpt2serve.policies.scheduling import SCHEDULING_POLICIES
from tests.conftest import hf_greedy, run_staggered, run_to_completion

BS = 4


def req(rid, tokens, lora=None, **params):
    return Request(rid, rid, list(tokens), SamplingParams(**params), 0.0, 1000, lora_id=lora)


def run_prefill(kv, r):
    """Admit ``r`` the way the scheduler does, compute its whole prompt, register its full blocks."""
    hit = kv.match_prefix(r)
    assert kv.allocate(r, r.num_tokens - hit.num_tokens, hit) is not None
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)
    return hit


def check_clean(kv):
    """After a scenario: every block free (cached or not) with no reference, and the index consistent."""
    kv.check_invariants()
    assert kv.all_free()
    assert all(rc == 0 for rc in kv.pool.ref_counts)


# ---------------------------------------------------------------- the hash chain
def test_hash_chain_depends_on_every_earlier_token_and_the_extra_keys():
    tokens = list(range(100, 116))
    base = block_hashes(tokens, BS)
    assert len(base) == 4 and len(set(base)) == 4
    assert block_hashes(tokens + [1, 2], BS) == base  # a partial block has no hash
    changed = block_hashes([7] + tokens[1:], BS)  # a change in block 0 changes every later hash
    assert all(a != b for a, b in zip(base, changed))
    tail_changed = block_hashes(tokens[:-1] + [7], BS)
    assert tail_changed[:3] == base[:3] and tail_changed[3] != base[3]
    # Same tokens in block 1 but a different block 0: a different chain.
    assert block_hashes([9, 9, 9, 9] + tokens[4:8], BS)[1] != base[1]
    assert block_hashes(tokens, BS, extra_keys=("adapter-a",)) != base
    assert block_hashes(tokens, BS, known=base[:2]) == base


def test_hashes_are_the_same_in_every_process():
    """The ingress, the router and each worker compute them: Python's str hash would differ per process."""
    code = ("from engine.prefix_cache import block_hashes;"
            "print(block_hashes(list(range(40)), 8, extra_keys=('lora-x',)))")
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert outs == {str(block_hashes(list(range(40)), 8, extra_keys=("lora-x",))) + "\n"}


# ---------------------------------------------------------------- the KV manager
def test_a_request_starts_from_the_longest_cached_prefix_in_whole_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = req("a", range(10))  # 2 full blocks + 2 tokens
    assert run_prefill(kv, a).num_tokens == 0
    b = req("b", list(range(8)) + [50, 51, 52])  # shares a's two full blocks
    hit = run_prefill(kv, b)
    assert hit.num_tokens == 8 and hit.blocks == kv.block_ids(a)[:2]
    assert kv.block_ids(b)[:2] == kv.block_ids(a)[:2] and kv.pool.ref_counts[kv.block_ids(a)[0]] == 2
    c = req("c", list(range(4)) + [60] * 6)  # shares only block 0
    assert run_prefill(kv, c).num_tokens == 4
    assert kv.stats()["prefix_cache_hits"] == 12 and kv.stats()["prefix_cache_queries"] == 31
    for r in (a, b, c):
        kv.free(r)
    check_clean(kv)


def test_whole_prompt_cached_still_computes_its_last_token_in_a_copy():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = req("a", range(8))
    run_prefill(kv, a)
    b = req("b", range(8))
    hit = kv.match_prefix(b)
    assert len(hit.blocks) == 2 and hit.num_tokens == 7  # the last token is computed again, for the logits
    assert kv.allocate(b, 1, hit) == []
    # Its last block is cached (and a's): the write goes to a copy, and the cached block stays as it was.
    (src, dst), = kv.pending_copies
    assert src == kv.block_ids(a)[1] and kv.block_ids(b) == [kv.block_ids(a)[0], dst]
    assert kv.pool.ref_counts[src] == 1 and kv.pool.block_hash[src] is not None
    kv.free(a)
    # Even with nobody else referencing it, a cached block is never written in place.
    c = req("c", range(8))
    hit = kv.match_prefix(c)
    assert kv.allocate(c, 1, hit) == [] and kv.pending_copies[-1][0] == src
    for r in (b, c):
        kv.free(r)
    check_clean(kv)


def test_collision_guard_compares_tokens_on_a_hit():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = req("a", range(8))
    run_prefill(kv, a)
    impostor = req("x", range(100, 108))
    impostor.block_hashes = list(a.block_hashes)  # as if its blocks collided with a's hashes
    assert kv.match_prefix(impostor).blocks == []
    kv.free(a)
    check_clean(kv)


def test_a_different_lora_adapter_is_a_miss():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = req("a", range(9), lora="sql")
    run_prefill(kv, a)
    assert kv.match_prefix(req("b", range(9), lora="sql")).num_tokens == 8
    assert kv.match_prefix(req("c", range(9), lora="chat")).num_tokens == 0
    assert kv.match_prefix(req("d", range(9))).num_tokens == 0  # the base model is not the adapter either
    kv.free(a)
    check_clean(kv)


def test_eviction_is_lru_with_tails_before_heads_and_uncached_blocks_first():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = req("a", range(12))  # 3 full blocks
    b = req("b", range(100, 110))  # 2 full blocks + 1 partial (not cached)
    run_prefill(kv, a)
    run_prefill(kv, b)
    ta, tb = kv.block_ids(a), kv.block_ids(b)
    kv.free(a)  # a is freed first: least recently used
    kv.free(b)
    untouched = sorted(set(range(8)) - set(ta) - set(tb))
    order = kv.pool.allocate(8)
    # Blocks caching nothing go first (b's partial tail, the untouched block), then a tail to head, then b.
    assert len(untouched) == 2 and sorted(order[:3]) == sorted([tb[2]] + untouched)
    assert order[3:] == [ta[2], ta[1], ta[0], tb[1], tb[0]]
    assert kv.pool.num_evictions == 5 and not kv.pool.cached
    events = kv.drain_cache_events()
    assert [s for _, s in events] == [True] * 5 + [False] * 5 and kv.drain_cache_events() == []
    kv.pool.release(order)
    check_clean(kv)


def test_a_freed_cached_block_is_revived_by_a_hit():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = req("a", range(9))
    run_prefill(kv, a)
    head = kv.block_ids(a)[:2]
    kv.free(a)
    assert kv.pool.num_free == 8 and kv.stats()["num_cached_blocks"] == 2
    b = req("b", list(range(8)) + [77, 78])
    run_prefill(kv, b)
    assert kv.block_ids(b)[:2] == head and [kv.pool.ref_counts[x] for x in head] == [1, 1]
    assert kv.pool.num_free == 5  # the revived two and one new block left the free queue
    kv.free(b)
    check_clean(kv)


def test_admission_with_a_hit_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = req("a", range(8))
    run_prefill(kv, a)
    kv.free(a)
    hog = req("hog", range(200, 208))
    kv.allocate(hog, 8)  # takes the two free blocks that cache nothing
    b = req("b", list(range(8)) + list(range(300, 312)))  # 2 cached blocks + 3 new ones: only 2 left
    hit = kv.match_prefix(b)
    assert len(hit.blocks) == 2 and kv.allocate(b, 12, hit) is None
    assert kv.block_ids(b) == [] and kv.pool.num_free == 2 and kv.stats()["prefix_cache_queries"] == 8
    kv.free(hog)
    kv.free(b)
    check_clean(kv)


def test_reference_counts_never_go_negative():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(AssertionError, match="double free"):
        pool.release(blocks)
    assert pool.ref_counts == [0, 0]


def test_swapped_in_request_shares_what_is_still_cached():
    kv = KVCacheManager(num_blocks=16, block_size=BS, num_cpu_blocks=8, enable_prefix_caching=True)
    a = req("a", range(14))
    run_prefill(kv, a)
    b = req("b", list(range(12)) + [90, 91, 92, 93, 94])
    run_prefill(kv, b)  # shares a's 3 full blocks, owns 2 more
    shared, own_full = kv.block_ids(a)[:3], kv.block_ids(b)[3]
    out = kv.swap_out(b)
    assert [d for d, _ in out] == kv.block_ids(a)[:3] + [d for d, _ in out][3:]
    assert kv.block_ids(a)[:3] == shared and [kv.pool.ref_counts[x] for x in shared] == [1, 1, 1]
    back = kv.swap_in(b)
    # The three shared blocks are a's again, and b's own full block is still cached (revived, not copied):
    # only its partial tail comes back from swap space.
    assert kv.block_ids(b)[:4] == shared + [own_full] and len(back) == 1
    assert [kv.pool.ref_counts[x] for x in shared] == [2, 2, 2]
    kv.check_invariants()
    for r in (a, b):
        kv.free(r)
    check_clean(kv)


def test_lpm_orders_by_cached_tokens_with_aging():
    lpm = SCHEDULING_POLICIES.build("lpm", max_wait_s=5.0)
    young_miss, young_hit, old_miss = (req(n, [1]) for n in ("young_miss", "young_hit", "old_miss"))
    young_miss.arrival_time, young_hit.arrival_time, old_miss.arrival_time = 9.0, 9.5, 1.0
    young_hit.num_cached_tokens = 64
    assert [r.request_id for r in lpm.order([young_miss, young_hit, old_miss], now=10.0)] == \
        ["old_miss", "young_hit", "young_miss"]
    assert [r.request_id for r in lpm.order([young_miss, young_hit, old_miss], now=5.0)] == \
        ["young_hit", "old_miss", "young_miss"]


# ---------------------------------------------------------------- the engine, caching on vs off
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def shared_prefix_prompts(hf_model):
    """Three system prompts of 40-70 tokens, each followed by 6 different questions of 1-30 tokens."""
    rng = random.Random(7)
    vocab = hf_model.config.vocab_size
    prompts = []
    for length in (40, 64, 70):
        head = [rng.randrange(vocab) for _ in range(length)]
        prompts += [head + [rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    prompts.append(list(prompts[0]))  # a repeat: the whole prompt is cached
    rng.shuffle(prompts)
    return prompts, [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_greedy_with_caching_equals_without_and_hf(make_engine, shared_prefix_prompts, block_size, policy):
    prompts, reference = shared_prefix_prompts
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    results = {}
    for caching in (True, False):
        engine = make_engine(block_size=block_size, num_gpu_blocks=4096 // block_size, max_num_batched_tokens=64,
                             enable_prefix_caching=caching, scheduling_policy=policy)
        results[caching] = run_staggered(engine, prompts, params, per_step=2)
        stats = engine.stats()
        if caching:
            assert stats["prefix_cache_hits"] > 0.4 * stats["prefix_cache_queries"]
        else:
            assert stats["prefix_cache_hits"] == 0 and stats["num_cached_blocks"] == 0
    assert results[True] == results[False] == reference


@pytest.mark.parametrize("policy", ["recompute", "swap"])
def test_greedy_with_caching_equals_without_while_preempting(make_engine, shared_prefix_prompts, policy):
    prompts, reference = shared_prefix_prompts
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    results = {}
    for caching in (True, False):
        # 320 tokens of pool for 19 requests of up to 116 tokens: the pool runs dry and evicts.
        engine = make_engine(block_size=8, num_gpu_blocks=40, max_num_batched_tokens=64, max_num_seqs=8,
                             preemption_policy=policy, enable_prefix_caching=caching)
        results[caching] = run_staggered(engine, prompts, params, per_step=2)
        counters = engine.scheduler.counters
        assert counters[f"preemptions_{policy}"] > 0
        if caching:
            assert engine.stats()["prefix_cache_hits"] > 0 and engine.stats()["prefix_cache_evictions"] > 0
    assert results[True] == results[False] == reference


def test_n_samples_share_a_cached_prompt_and_copy_before_writing(make_engine, shared_prefix_prompts):
    prompts, _ = shared_prefix_prompts
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    outs = {}
    for caching in (True, False):
        engine = make_engine(enable_prefix_caching=caching)
        engine.add_request("warm", prompts[0], SamplingParams(max_tokens=1))
        run_to_completion(engine)
        engine.add_request("n3", prompts[0], params)  # its whole prompt is cached when caching is on
        outs[caching] = [o.token_ids for o in run_to_completion(engine)["n3"].outputs]
        if caching:
            assert engine.stats()["prefix_cache_hits"] >= len(prompts[0]) - 16
    assert outs[True] == outs[False]
    assert len({tuple(t) for t in outs[True]}) > 1
