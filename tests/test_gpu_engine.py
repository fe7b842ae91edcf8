"""The GPU fast path (Triton kernels, CUDA graphs) against the PyTorch reference path. Skipped without a GPU."""

import random

import pytest
import torch

from gpt2serve import LLM, SamplingParams
from tests.conftest import engine_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _greedy(model_dir, prompts, **overrides):
    settings = dict(device="cuda", num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=512)
    settings.update(overrides)
    llm = LLM(engine_config(model_dir, **settings))
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=32, temperature=0,
                                                                                  ignore_eos=True))
    assert llm.engine.kv.all_free()
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    rng = random.Random(7)
    return [[rng.randrange(500) for _ in range(rng.randint(1, 300))] for _ in range(64)]


def test_triton_with_graphs_equals_the_reference_path_in_fp32(tiny_model_dir, prompts):
    ref, _ = _greedy(tiny_model_dir, prompts, attention_backend="torch", dtype="float32")
    fast, llm = _greedy(tiny_model_dir, prompts, attention_backend="triton", dtype="float32")
    assert llm.engine.runner.graphs is not None
    assert fast == ref


def test_graphs_equal_eager(tiny_model_dir, prompts):
    # fp32: at batch 1 the graph runs the fused small-batch linear kernel, whose fp16 rounding differs from
    # cuBLAS's; in fp32 both are exact enough that greedy choices agree.
    eager, _ = _greedy(tiny_model_dir, prompts, attention_backend="triton", dtype="float32", enforce_eager=True)
    graphs, llm = _greedy(tiny_model_dir, prompts, attention_backend="triton", dtype="float32")
    assert 1 in llm.engine.runner.graphs.graphs  # the batch-1 graph (fused linears) served the tail of the run
    assert graphs == eager


def test_memory_profile_sizes_the_pool(tiny_model_dir):
    llm = LLM(engine_config(tiny_model_dir, device="cuda", num_gpu_blocks=None, gpu_memory_utilization=0.3,
                            dtype="float16"))
    runner = llm.engine.runner
    free, total = torch.cuda.mem_get_info()
    pool_bytes = runner.num_blocks * runner.bytes_per_block
    assert 0.2 * total < pool_bytes < 0.3 * total
