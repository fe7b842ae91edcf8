"""The draft-model proposer on the CPU: exact greedy proposals (HF ``generate`` is the reference), the common-prefix
rollback after partial acceptance, block accounting, a pool that is too small, sampled proposals and their q.

Proposers built here are checked after each test: once every request is dropped, the draft's pool is entirely
free and every block-table row is back.
"""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from gpt2serve.engine.attention import TorchAttentionBackend
from gpt2serve.engine.cuda_graphs import DecodeGraphs
from gpt2serve.engine.kv_manager import cdiv
from gpt2serve.engine.sampling_params import SamplingParams
from gpt2serve.engine.spec_decode.draft_model import DraftModelProposer
from gpt2serve.engine.spec_decode.proposer import PROPOSERS, ProposalRequest, build_proposer
from gpt2serve.engine.tiny_model import build_tiny_checkpoint
from tests.conftest import engine_config, hf_greedy

K = 4
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A smaller model with the tiny target's vocabulary: same corpus and size, so the same BPE merges."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "gpt2-tiny-draft", n_layer=1, n_embd=32,
                                 n_head=2, seed=1)


@pytest.fixture
def make_proposer(tiny_model_dir):
    built = []

    def make(draft=None, num_blocks=None, graphs=False, **overrides) -> DraftModelProposer:
        spec = {"method": "draft_model", "draft_model": str(draft or tiny_model_dir), "num_speculative_tokens": K,
                "draft_kv_cache_gib": 0.01}  # 655 blocks of the tiny model
        config = engine_config(tiny_model_dir, speculative=spec, **overrides)
        proposer = DraftModelProposer(config, torch.device("cpu"), torch.float32, TorchAttentionBackend(),
                                      num_blocks=num_blocks)
        if graphs:  # the graph path (static buffers, padding, catch-up passes), replayed eagerly
            proposer.graphs = _EagerGraphs(proposer.model, proposer.kv_caches, config.max_num_seqs,
                                           proposer.max_blocks_per_seq, proposer.max_model_len, proposer.device)
        built.append(proposer)
        return proposer

    yield make
    for proposer in built:
        proposer.drop(list(proposer.seqs))
        assert proposer.pool.num_free == proposer.num_blocks, "draft KV blocks leaked"
        assert sorted(proposer._free_rows) == list(range(proposer.block_table.shape[0]))


class _EagerGraphs(DecodeGraphs):
    def _capture(self, forward, device):
        logits = forward()
        return SimpleNamespace(replay=lambda: logits.copy_(forward())), logits


def _prompts(lengths, seed=0, vocab=500):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _requests(prompts, nums=None, params=GREEDY, prefix="r"):
    nums = nums or [K] * len(prompts)
    return [ProposalRequest(f"{prefix}{i}", list(p), len(p), n, params, 0)
            for i, (p, n) in enumerate(zip(prompts, nums))]


def _held_blocks(proposer, req):
    return len(proposer.seqs[req.req_id].blocks)


def test_build_proposer_and_registry(make_proposer, tiny_model_dir):
    assert "draft_model" in PROPOSERS.names
    config = engine_config(tiny_model_dir, speculative={"method": "draft_model", "draft_model": str(tiny_model_dir),
                                                       "draft_kv_cache_gib": 0.001})
    proposer = build_proposer(config, torch.device("cpu"), torch.float32, TorchAttentionBackend())
    assert isinstance(proposer, DraftModelProposer) and proposer.name == "draft_model"
    # The pool is sized from draft_kv_cache_gib, on the CPU too: 2 x 2 layers x 16 tokens x 64 x 4 bytes a block.
    assert proposer.num_blocks == int(0.001 * 2**30 // (2 * 2 * 16 * 64 * 4))
    assert proposer.kv_cache.shape == (2, 2, proposer.num_blocks, 16, 4, 16)


def test_vocabulary_mismatch_is_a_clear_error(tiny_model_dir, tmp_path):
    other = build_tiny_checkpoint(tmp_path / "other-vocab", n_layer=1, n_embd=32, n_head=2, vocab_size=400)
    config = engine_config(tiny_model_dir, speculative={"method": "draft_model", "draft_model": str(other)})
    with pytest.raises(ValueError, match="vocabulary of 400 tokens.*512"):
        DraftModelProposer(config, torch.device("cpu"), torch.float32, TorchAttentionBackend(), num_blocks=8)
    config = engine_config(tiny_model_dir, speculative={"method": "draft_model"})
    with pytest.raises(ValueError, match="draft_model"):
        DraftModelProposer(config, torch.device("cpu"), torch.float32, TorchAttentionBackend())


@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_proposals_are_the_draft_models_greedy_continuation(make_proposer, hf_model, graphs):
    """(a) With the target's own weights the proposals are exactly HF's greedy continuation: a 150-token prompt
    is caught up over three passes (64-token budget), and shorter proposals (near max_tokens) shrink the batch."""
    proposer = make_proposer(graphs=graphs)
    prompts = _prompts([5, 17, 150, 33, 1])
    reqs = _requests(prompts, nums=[K, 2, K, 1, 3])
    out = proposer.propose(reqs)
    for r in reqs:
        assert out[r.req_id].probs is None
        assert out[r.req_id].token_ids == hf_greedy(hf_model, r.token_ids, r.num_tokens), r.req_id
        # K/V for the context and every proposal but the last.
        assert _held_blocks(proposer, r) == cdiv(len(r.token_ids) + r.num_tokens - 1, 16)
    assert proposer.stats()["draft_proposed_tokens"] == K + 2 + K + 1 + 3
    proposer.drop([r.req_id for r in reqs])
    assert proposer.pool.num_free == proposer.num_blocks and not proposer.seqs


def test_a_smaller_draft_proposes_its_own_greedy_continuation(make_proposer, draft_dir, tiny_model_dir):
    from transformers import GPT2LMHeadModel

    vocab = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (draft_dir, tiny_model_dir)]
    assert vocab[0] == vocab[1]
    hf_draft = GPT2LMHeadModel.from_pretrained(draft_dir, torch_dtype=torch.float32).eval()
    proposer = make_proposer(draft=draft_dir)
    assert proposer.model.num_layers == 1
    reqs = _requests(_prompts([12, 40], seed=3))
    out = proposer.propose(reqs)
    for r in reqs:
        assert out[r.req_id].token_ids == hf_greedy(hf_draft, r.token_ids, K)


@pytest.mark.parametrize("graphs", [False, True])
def test_incremental_proposals_after_partial_acceptance(make_proposer, hf_model, graphs):
    """(b) Each round a request accepts a run of its proposals, then gets one token of the target's that differs
    from the next proposal (or a bonus token after all of them): the next proposals are still exact, and only the
    tokens past the common prefix are fed again (one, or two after a full acceptance)."""
    proposer = make_proposer(graphs=graphs)
    rng = random.Random(7)
    reqs = _requests(_prompts([9, 30, 61, 16], seed=1))
    out = proposer.propose(reqs)
    for rnd in range(6):
        for i, r in enumerate(reqs):
            proposal = out[r.req_id].token_ids
            accepted = (rnd + i) % (len(proposal) + 1) if rnd < 5 else len(proposal)
            if accepted < len(proposal):
                other = rng.choice([t for t in range(500) if t != proposal[accepted]])
            else:
                other = rng.randrange(500)
            r.token_ids += proposal[:accepted] + [other]
            r.num_tokens = 1 + (rnd + 2 * i) % K
            seq = proposer.seqs[r.req_id]
            expected_prefix = len(r.token_ids) - 1 - accepted + min(accepted, len(proposal) - 1)
            assert proposer._valid_prefix(seq, r.token_ids) == expected_prefix
        out = proposer.propose(reqs)
        for r in reqs:
            assert out[r.req_id].token_ids == hf_greedy(hf_model, r.token_ids, r.num_tokens), (rnd, r.req_id)
            assert _held_blocks(proposer, r) == cdiv(len(r.token_ids) + r.num_tokens - 1, 16)

    # Tokens that were never proposed (the request sat out a step): three, two and one to catch up, in graph
    # passes where the rows with less to feed write nothing until their turn.
    for r, extra in zip(reqs, (3, 2, 1, 3)):
        r.token_ids += [rng.randrange(500) for _ in range(extra)]
        r.token_ids[-extra] = (out[r.req_id].token_ids[0] + 1) % 500
    out = proposer.propose(reqs)
    for r in reqs:
        assert out[r.req_id].token_ids == hf_greedy(hf_model, r.token_ids, r.num_tokens), r.req_id

    # The same tokens again (nothing accepted in between, or a preempted request back after drop): the same
    # proposals, from one token fed again or from a full recompute.
    before = {r.req_id: out[r.req_id].token_ids for r in reqs}
    assert {k: p.token_ids for k, p in proposer.propose(reqs).items()} == before
    proposer.drop([reqs[1].req_id])
    assert reqs[1].req_id not in proposer.seqs
    assert {k: p.token_ids for k, p in proposer.propose(reqs).items()} == before


def test_context_that_changed_under_the_same_id_is_recomputed(make_proposer, hf_model):
    proposer = make_proposer()
    (r,) = _requests(_prompts([20], seed=5))
    proposer.propose([r])
    r.token_ids = _prompts([24], seed=6)[0]  # not a continuation: the last confirmed token differs
    assert proposer._valid_prefix(proposer.seqs[r.req_id], r.token_ids) == 0
    assert proposer.propose([r])[r.req_id].token_ids == hf_greedy(hf_model, r.token_ids, K)


def test_drop_frees_every_block(make_proposer):
    """(c) Blocks come back on drop, whatever state a request was in; unknown ids are ignored."""
    proposer = make_proposer(num_blocks=64)
    reqs = _requests(_prompts([40, 3, 70]))
    proposer.propose(reqs)
    assert proposer.pool.num_free == 64 - sum(cdiv(len(r.token_ids) + K - 1, 16) for r in reqs)
    proposer.drop([reqs[0].req_id, "never-seen"])
    assert proposer.pool.num_free == 64 - sum(cdiv(len(r.token_ids) + K - 1, 16) for r in reqs[1:])
    proposer.drop([r.req_id for r in reqs])
    assert proposer.pool.num_free == 64 and proposer.stats()["draft_kv_usage"] == 0.0


def test_a_short_pool_proposes_for_what_fits(make_proposer, hf_model):
    """(d) Eight blocks for four 30-token requests that want three each (30 + 3 K/V slots): the first two get
    their four tokens, the third the three that its two blocks leave room for (32 slots: 30 + 2), the fourth
    nothing; never an exception. Once a request is dropped the others use its blocks."""
    proposer = make_proposer(num_blocks=8)
    reqs = _requests(_prompts([30, 30, 30, 30], seed=2))

    def check(out, lengths):
        assert [len(out[r.req_id].token_ids) if r.req_id in out else 0 for r in reqs] == lengths
        for r in reqs:
            if r.req_id in out:
                assert out[r.req_id].token_ids == hf_greedy(hf_model, r.token_ids, len(out[r.req_id].token_ids))

    check(proposer.propose(reqs), [K, K, 3, 0])
    assert proposer.stats()["draft_no_room"] == 1 and proposer.pool.num_free == 0
    proposer.drop([reqs[0].req_id])
    check(proposer.propose(reqs[1:]), [0, K, K, 3])
    assert proposer.pool.num_free == 0 and proposer.stats()["draft_kv_usage"] == 1.0


def test_out_of_block_table_rows_and_full_context(make_proposer, hf_model):
    proposer = make_proposer(max_num_seqs=2)
    reqs = _requests(_prompts([8, 8, 8]))
    out = proposer.propose(reqs)
    assert set(out) == {"r0", "r1"} and proposer.stats()["draft_no_room"] == 1
    proposer.drop(["r0"])
    assert set(proposer.propose(reqs[1:])) == {"r1", "r2"}
    # 510 of 512 positions used: K/V fits for two more tokens, so at most three proposals; a full context gets none.
    (long,) = _requests(_prompts([510], seed=4), prefix="long")
    proposer.drop(["r1", "r2"])
    assert proposer.propose([long])["long0"].token_ids == hf_greedy(hf_model, long.token_ids, 3)
    (full,) = _requests(_prompts([513], seed=4), prefix="full")
    assert proposer.propose([full]) == {}


def test_sampled_proposals_report_their_distribution(make_proposer, hf_model):
    """(e) Sampled rows: each proposal comes with the distribution it was drawn from (rows summing to 1, the
    proposed token in its support), which is HF's distribution of the same context after temperature and
    top-k; greedy rows beside them carry none."""
    proposer = make_proposer()
    params = SamplingParams(temperature=0.7, top_k=20, seed=3)
    prompts = _prompts([12, 25, 7], seed=9)
    reqs = _requests(prompts[:2], params=params) + _requests(prompts[2:], prefix="g")
    reqs[1].num_tokens = 2
    out = proposer.propose(reqs)
    assert out["g0"].probs is None and out["g0"].token_ids == hf_greedy(hf_model, reqs[2].token_ids, K)
    for r in reqs[:2]:
        prop = out[r.req_id]
        assert prop.probs.shape == (r.num_tokens, 512) and prop.probs.dtype == torch.float32
        torch.testing.assert_close(prop.probs.sum(dim=-1), torch.ones(r.num_tokens))
        for j, token in enumerate(prop.token_ids):
            assert prop.probs[j, token] > 0
            with torch.no_grad():
                logits = hf_model(torch.tensor([r.token_ids + prop.token_ids[:j]])).logits[0, -1] / 0.7
            logits[logits < logits.topk(20).values[-1]] = float("-inf")
            torch.testing.assert_close(prop.probs[j], torch.softmax(logits, dim=-1), atol=1e-5, rtol=1e-4)


def test_seeded_proposals_are_reproducible(make_proposer):
    proposer = make_proposer()
    prompts = _prompts([12, 25], seed=9)
    seeded = _requests(prompts, params=SamplingParams(temperature=1.0, top_p=0.95, seed=11))
    first = {k: p.token_ids for k, p in proposer.propose(seeded).items()}
    proposer.drop(list(first))
    # Alone, in another order, beside unseeded rows, in a fresh proposer: the same draws.
    noise = _requests(_prompts([30, 4], seed=1), params=SamplingParams(temperature=1.0), prefix="n")
    again = proposer.propose([noise[0], seeded[1], noise[1], seeded[0]])
    assert {k: again[k].token_ids for k in first} == first
    assert {k: p.token_ids for k, p in make_proposer().propose(seeded).items()} == first
    other = _requests(prompts, params=SamplingParams(temperature=1.0, top_p=0.95, seed=12), prefix="o")
    assert [p.token_ids for p in make_proposer().propose(other).values()] != list(first.values())


def test_sampled_first_proposals_follow_their_distribution(make_proposer):
    """1,500 seeds of one context under top-k 4: the first proposals' frequencies fit the reported q (chi-square
    at significance 0.001, 3 degrees of freedom)."""
    n = 1500
    proposer = make_proposer(max_num_seqs=n, max_num_batched_tokens=8192, num_blocks=n)
    prompt = _prompts([6], seed=4)[0]
    reqs = [ProposalRequest(f"s{i}", list(prompt), 6, 1, SamplingParams(temperature=1.0, top_k=4, seed=i))
            for i in range(n)]
    out = proposer.propose(reqs)
    q = out["s0"].probs[0]
    assert all(torch.equal(out[r.req_id].probs[0], q) for r in reqs[:50])
    support = torch.nonzero(q).flatten()
    assert len(support) == 4
    counts = torch.bincount(torch.tensor([out[r.req_id].token_ids[0] for r in reqs]), minlength=q.numel())
    assert int(counts.sum()) == int(counts[support].sum()) == n
    expected = q[support].double() * n
    assert float(((counts[support] - expected) ** 2 / expected).sum()) < 16.27


@pytest.mark.parametrize("preempt", [False, True])
def test_engine_with_a_draft_model_keeps_the_greedy_output(make_engine, tiny_model_dir, draft_dir, hf_model, preempt):
    """Through the engine: with the target's own weights as the draft every proposal is accepted; with the smaller
    draft some are not; either way the output is HF's greedy output, also while requests are preempted, and the
    draft's pool is entirely free once the last finished requests have been dropped."""
    from tests.conftest import run_to_completion

    prompts = _prompts([9, 30, 17, 50], seed=12)
    reference = [hf_greedy(hf_model, p, 20) for p in prompts]
    small_pool = dict(block_size=8, num_gpu_blocks=14, max_num_batched_tokens=32) if preempt else {}
    for draft, accepts_all in ((tiny_model_dir, True), (draft_dir, False)):
        engine = make_engine(speculative={"method": "draft_model", "draft_model": str(draft),
                                          "num_speculative_tokens": 3, "draft_kv_cache_gib": 0.01}, **small_pool)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        done = run_to_completion(engine)
        assert [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == reference
        c = engine.scheduler.counters
        assert c["spec_num_draft_tokens"] > 0
        assert (c["spec_num_accepted_tokens"] == c["spec_num_draft_tokens"]) == accepts_all
        assert not preempt or c["preemptions_recompute"] > 0
        proposer = engine.runner.proposer
        engine.step()  # carries the last finished ids to the runner
        assert not proposer.seqs and proposer.pool.num_free == proposer.num_blocks


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where there is no GPU (conftest); "
                    "test_gpu_draft_model_in_the_engine covers the kernels there")
def test_triton_kernels_read_the_draft_metadata(tiny_model_dir, hf_model):
    """The Triton attention kernels (in the interpreter) on the draft's metadata: an eager catch-up beside a context,
    and graph passes (replayed eagerly) in which the rows with less to catch up write nothing until their turn."""
    from gpt2serve.engine.attention import get_attention_backend

    spec = {"method": "draft_model", "draft_model": str(tiny_model_dir), "num_speculative_tokens": 3,
            "draft_kv_cache_gib": 0.002}
    config = engine_config(tiny_model_dir, speculative=spec, max_num_seqs=2)
    proposer = DraftModelProposer(config, torch.device("cpu"), torch.float32,
                                  get_attention_backend("triton", torch.device("cpu")))
    proposer.graphs = _EagerGraphs(proposer.model, proposer.kv_caches, 2, proposer.max_blocks_per_seq,
                                   proposer.max_model_len, proposer.device)
    reqs = _requests(_prompts([5, 40], seed=8), nums=[3, 2])
    out = proposer.propose(reqs)
    for extra in ((1, 3), (5, 2)):  # graph catch-ups of 0 and 2 extra tokens, then an eager one beside a graph one
        for r, n in zip(reqs, extra):
            r.token_ids += [(out[r.req_id].token_ids[0] + 1) % 500] + [7] * (n - 1)
        out = proposer.propose(reqs)
        for r in reqs:
            assert out[r.req_id].token_ids == hf_greedy(hf_model, r.token_ids, r.num_tokens), (extra, r.req_id)
    proposer.drop([r.req_id for r in reqs])
    assert proposer.pool.num_free == proposer.num_blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("draft", ["target", "smaller"])
def test_gpu_draft_model_in_the_engine(tiny_model_dir, draft_dir, hf_model, draft):
    """On the GPU (Triton kernels, the draft's CUDA graphs, its warm-up, pinned staging), fp32: greedy outputs
    equal HF's, and a draft equal to the target has every proposal accepted; seeded sampling reproduces."""
    from gpt2serve import LLM

    spec = {"method": "draft_model", "draft_model": str(tiny_model_dir if draft == "target" else draft_dir),
            "num_speculative_tokens": 4, "draft_kv_cache_gib": 0.05}
    llm = LLM(engine_config(tiny_model_dir, device="cuda", dtype="float32", attention_backend="triton",
                            num_gpu_blocks=4096, max_num_seqs=32, max_num_batched_tokens=512, speculative=spec,
                            enable_prefix_caching=False))  # the seeded runs below then compute the same shapes
    proposer = llm.engine.runner.proposer
    assert isinstance(proposer, DraftModelProposer) and proposer.graphs is not None
    prompts = _prompts([1, 7, 40, 130, 300] * 4, seed=10)
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model, p, 32) for p in prompts]
    c = llm.engine.scheduler.counters
    assert c["spec_num_draft_tokens"] > 0
    assert (c["spec_num_accepted_tokens"] == c["spec_num_draft_tokens"]) == (draft == "target")
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)
    first = llm.generate(prompt_token_ids=prompts[:3], sampling_params=seeded)
    again = llm.generate(prompt_token_ids=prompts[:3], sampling_params=seeded)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    llm.engine.step()  # carries the last finished ids to the runner
    assert proposer.pool.num_free == proposer.num_blocks
