"""Tensor and pipeline parallelism on CPUs (gloo): a tiny model split over 2 processes against the same model in one.

The model has 5 heads and 3 blocks, so both splits are uneven (3 + 2 heads; 2 + 1 blocks), as GPT-2 XL's 25 heads
are over 2 GPUs. Each engine is built in this process (rank 0, the driver) and starts its follower rank itself.
"""

import random

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.distributed import shard_range, split_sizes
from engine.tiny_model import build_tiny_checkpoint
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


def _run(model_dir, prompts, params, **parallel):
    engine = LLMEngine(engine_config(model_dir, num_gpu_blocks=128, **parallel))
    model = engine.runner.model  # rank 0's share: 3 of 5 heads, or 2 of 3 blocks
    assert (model.num_heads, model.num_layers) == {(): (5, 3), ("tensor_parallel_size",): (3, 3),
                                                   ("pipeline_parallel_size",): (5, 2)}[tuple(parallel)]
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        done = run_to_completion(engine)
        assert engine.kv.all_free(), engine.stats()
        return [done[f"r{i}"] for i in range(len(prompts))]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_two_ranks_give_the_single_process_output(odd_heads_model, parallel):
    rng = random.Random(4)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (3, 17, 40, 9)]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    one = _run(odd_heads_model, prompts, params)
    two = _run(odd_heads_model, prompts, params, **parallel)
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
