"""The engine against HuggingFace transformers on the same weights: greedy tokens and logprobs."""

import random

import pytest
import torch

from gpt2serve import SamplingParams
from tests.conftest import hf_greedy, run_staggered, run_to_completion

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts_and_reference(hf_model):
    """18 prompts of 1 to 200 tokens with HF's greedy continuation of each."""
    rng = random.Random(1234)
    vocab = hf_model.config.vocab_size
    lengths = [1, 2, 200, 7, 16, 17, 33, 64, 128, 150, 3, 90, 31, 48, 199, 5, 120, 60]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    return prompts, [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_greedy_equals_hf_generate(make_engine, prompts_and_reference, block_size):
    prompts, reference = prompts_and_reference
    # 64-token budget per step: prompts over 64 tokens are split into chunks while others decode.
    engine = make_engine(block_size=block_size, num_gpu_blocks=8192 // block_size, max_num_batched_tokens=64)
    got = run_staggered(engine, prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    assert got == reference


@pytest.mark.parametrize("policy", ["recompute", "swap"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_greedy_equals_hf_while_preempting(make_engine, prompts_and_reference, policy, block_size):
    prompts, reference = prompts_and_reference
    # 448 tokens of pool for 18 requests of up to 224 tokens each: the pool runs dry mid-decode.
    engine = make_engine(block_size=block_size, num_gpu_blocks=448 // block_size, max_num_batched_tokens=64,
                         preemption_policy=policy, swap_space_gib=0.05)
    got = run_staggered(engine, prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    assert got == reference
    counters = engine.scheduler.counters
    assert counters[f"preemptions_{policy}"] > 0
    if policy == "swap":
        assert counters["swap_in"] == counters["swap_out"] > 0


def test_logprobs_match_hf_log_softmax(make_engine, hf_model, prompts_and_reference):
    prompts, _ = prompts_and_reference
    engine = make_engine(max_num_batched_tokens=48)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=7, logprobs=5, prompt_logprobs=5)
    for i, p in enumerate(prompts[:8]):
        engine.add_request(f"r{i}", p, params)
    done = run_to_completion(engine)
    for i, prompt in enumerate(prompts[:8]):
        out = done[f"r{i}"]
        seq = out.outputs[0]
        full = torch.tensor([prompt + seq.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(full).logits[0].float(), dim=-1)
        # Generated tokens: chosen logprob, rank and the top 5.
        for j, lp in enumerate(seq.logprobs):
            row = ref[len(prompt) - 1 + j]
            assert lp.token_id == seq.token_ids[j]
            assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
            assert lp.rank == int((row > row[lp.token_id]).sum()) + 1
            top_vals, top_ids = row.topk(5)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert max(abs(v - r) for (_, v), r in zip(lp.top, top_vals.tolist())) < 1e-4
        # Prompt tokens: none for the first, then each token given its prefix.
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for pos in range(1, len(prompt)):
            lp = out.prompt_logprobs[pos]
            assert lp.token_id == prompt[pos]
            assert abs(lp.logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
            assert [t for t, _ in lp.top] == ref[pos - 1].topk(5).indices.tolist()
        assert abs(seq.cumulative_logprob - sum(ref[len(prompt) - 1 + j, t].item()
                                                for j, t in enumerate(seq.token_ids))) < 1e-3
