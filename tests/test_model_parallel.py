"""Tensor and pipeline parallelism on CPUs (gloo): a tiny model split over 2 processes against the same model in one.

The model has 5 heads and 3 blocks, so both splits are uneven (3 + 2 heads; 2 + 1 blocks), as GPT-2 XL's 25 heads
are over 2 GPUs. Each engine is built in this process (rank 0, the driver) and starts its follower rank itself.
"""

import random

import pytest
import torch

from gpt2serve import LLMEngine, SamplingParams
from gpt2serve.engine.attention import AttentionMetadata
from gpt2serve.engine.distributed import PipelineParallel, shard_range, split_sizes
from gpt2serve.engine.tiny_model import build_tiny_checkpoint
from tests.conftest import engine_config, run_to_completion

pytestmark = pytest.mark.timeout(300)

NEW = 16


def test_uneven_splits_cover_every_item_once():
    assert split_sizes(25, 2) == [13, 12] and split_sizes(5, 2) == [3, 2] and split_sizes(6400, 3) == [2134, 2133, 2133]
    for n, parts in ((25, 2), (5, 3), (7, 4), (4, 4)):
        covered = [i for r in range(parts) for i in shard_range(n, parts, r)]
        assert covered == list(range(n))


@pytest.fixture(scope="module")
def odd_heads_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "gpt2-5-heads", n_layer=3, n_embd=60, n_head=5)


def test_a_step_splits_into_micro_batches_of_whole_sequences():
    qsl = [0, 40, 41, 42, 43, 60, 61]  # a 40-token prefill, decodes, a 17-token prefill chunk, a decode
    meta = AttentionMetadata(slot_mapping=torch.arange(61), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                             seq_lens=torch.tensor([40, 7, 8, 9, 30, 11], dtype=torch.int32),
                             block_tables=torch.arange(12, dtype=torch.int32).reshape(6, 2), max_query_len=40,
                             max_seq_len=40, lora_slots=torch.arange(61) % 3)
    for parts in (1, 2, 3, 6, 9):
        groups = meta.split(parts, qsl)
        assert 1 <= len(groups) <= parts
        assert [g[0] for g in groups][0] == 0 and groups[-1][1] == 61
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))  # consecutive, nothing lost
        rows = torch.cat([torch.arange(t0, t1) for t0, t1, _ in groups])
        seqs = torch.cat([g.seq_lens for _, _, g in groups])
        assert torch.equal(rows, torch.arange(61)) and torch.equal(seqs, meta.seq_lens)
        for t0, t1, g in groups:
            assert int(g.query_start_loc[0]) == 0 and int(g.query_start_loc[-1]) == t1 - t0
            assert torch.equal(g.slot_mapping, meta.slot_mapping[t0:t1])
            assert torch.equal(g.lora_slots, meta.lora_slots[t0:t1])
            assert len(g.block_tables) == len(g.seq_lens) == len(g.query_start_loc) - 1
    # Balanced by tokens, cut at the sequence start nearest to each share: the 40-token prefill is a group of its
    # own in two and three groups.
    assert [(t0, t1) for t0, t1, _ in meta.split(2, qsl)] == [(0, 40), (40, 61)]
    assert [(t0, t1) for t0, t1, _ in meta.split(3, qsl)] == [(0, 40), (40, 41), (41, 61)]
    assert len(meta.split(6, qsl)) == 6


def _run(model_dir, prompts, params, **parallel):
    engine = LLMEngine(engine_config(model_dir, num_gpu_blocks=128, **parallel))
    model = engine.runner.model  # rank 0's share: 3 of 5 heads, or 2 of 3 blocks
    heads = 3 if parallel.get("tensor_parallel_size", 1) > 1 else 5
    assert (model.num_heads, model.num_layers) == (heads, 2 if parallel.get("pipeline_parallel_size", 1) > 1 else 3)
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        done = run_to_completion(engine)
        assert engine.kv.all_free(), engine.stats()
        return [done[f"r{i}"] for i in range(len(prompts))]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2},
                                      {"pipeline_parallel_size": 2, "pipeline_micro_batches": 1},
                                      {"pipeline_parallel_size": 2, "pipeline_micro_batches": 3}],
                         ids=["tp2", "pp2", "pp2-micro3"])
@pytest.mark.slow  # two processes per case, each importing torch
def test_two_ranks_give_the_single_process_output(odd_heads_model, parallel, monkeypatch):
    rng = random.Random(4)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (3, 17, 40, 9)]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    one = _run(odd_heads_model, prompts, params)
    # The first stage runs in this process: count what it passes down per step.
    sends, send = [], PipelineParallel.send_activations
    monkeypatch.setattr(PipelineParallel, "send_activations", lambda pp, x: sends.append(len(x)) or send(pp, x))
    two = _run(odd_heads_model, prompts, params, **parallel)
    if parallel.get("pipeline_parallel_size", 1) > 1:
        # Every token goes down once. Whole steps without micro-batches: most steps decode all 4 prompts at once.
        # With 3, no step goes down whole: the prompts' first step (64 tokens within the budget) is cut between
        # prompts near its thirds (3 + 17 | 40 | 4), and each step of 4 decodes into 3 messages.
        assert sum(sends) == sum(len(p) for p in prompts) + len(prompts) * (NEW - 1)
        if parallel["pipeline_micro_batches"] == 1:
            assert sends[0] == 64 and sends.count(4) >= NEW - 3
        else:
            assert sends[:3] == [20, 40, 4] and 4 not in sends[3:] and sends.count(2) >= NEW - 3
    for prompt, a, b in zip(prompts, one, two):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids  # greedy, token for token
        # Log-probabilities at every prompt and output position (the chosen token and the top 5): the logits
        # after log-softmax.
        pairs = list(zip(a.prompt_logprobs[1:] + a.outputs[0].logprobs, b.prompt_logprobs[1:] + b.outputs[0].logprobs))
        assert len(pairs) == len(prompt) - 1 + NEW
        for x, y in pairs:
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            got = torch.tensor([y.logprob] + [v for _, v in y.top])
            want = torch.tensor([x.logprob] + [v for _, v in x.top])
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
