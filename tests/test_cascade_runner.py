"""The runner's shared-prefix detection (``find_shared_prefixes``) and cascade decode steps end to end.

The detection is a pure numpy function, tested on hand-built block tables. The engine tests compare greedy
outputs with cascade attention on and off: on a CPU-only machine through the Triton interpreter with the
thresholds lowered to fit the tiny model, and on a GPU at the runner's real thresholds, where cascade steps replay
CUDA graphs and must compile nothing once the engine has started.
"""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gpt2serve.engine.model_runner as model_runner
from gpt2serve import LLM, SamplingParams
from gpt2serve.engine.attention import MAX_CASCADE_GROUPS, find_shared_prefixes
from gpt2serve.engine.cuda_graphs import DecodeGraphs, cascade_bucket_sizes
from tests.conftest import engine_config

BS = 4


def _table(*blocks, width=8, fill=99):
    row = np.full(width, fill, dtype=np.int32)
    row[:len(blocks)] = blocks
    return row


def test_no_sharing_gives_none():
    tables = np.stack([_table(i, 10 + i, 20 + i) for i in range(6)])
    assert find_shared_prefixes(tables, np.full(6, 12), BS, min_group=2, min_tokens=4) is None


def test_too_small_or_too_short_groups_give_none():
    tables = np.stack([_table(1, 2, 3, 10 + i) for i in range(3)])
    lens = np.full(3, 14)
    assert find_shared_prefixes(tables, lens, BS, min_group=4, min_tokens=4) is None  # only 3 members
    assert find_shared_prefixes(tables, lens, BS, min_group=2, min_tokens=13) is None  # 12 shared tokens


def test_partial_sharing():
    # Rows 0, 2, 4 share blocks 1 2 3; rows 1, 5 share block 7 only; row 3 shares nothing.
    tables = np.stack([
        _table(1, 2, 3, 40), _table(7, 8, 41), _table(1, 2, 3, 42, 43), _table(9, 44), _table(1, 2, 3, 45),
        _table(7, 6, 46),
    ])
    lens = np.array([15, 11, 19, 6, 13, 9])
    c = find_shared_prefixes(tables, lens, BS, min_group=2, min_tokens=4)
    assert c.num_shared_groups == 2
    groups = [sorted(c.group_rows[a:b].tolist()) for a, b in zip(c.group_query_start[:-1], c.group_query_start[1:])]
    assert groups == [[0, 2, 4], [1, 5], [3]]  # the rows that share nothing come last
    assert c.prefix_lens.tolist() == [12, 4, 0]
    assert c.prefix_tables[0].tolist() == [1, 2, 3] and c.prefix_tables[1, 0] == 7
    assert sorted(c.group_rows.tolist()) == list(range(6))
    assert c.suffix_lens.tolist() == [3, 7, 7, 6, 1, 5]
    # Each row's table past its prefix: row 2 starts at its own block 42, row 5 at 6, row 3 keeps all of its own.
    assert c.suffix_tables[2, :2].tolist() == [42, 43]
    assert c.suffix_tables[5, :2].tolist() == [6, 46]
    assert c.suffix_tables[3, :2].tolist() == [9, 44]
    assert (c.max_group_size, c.max_prefix_len, c.max_suffix_len) == (3, 12, 7)

    # With a higher bar the one-block group joins the rows that share nothing.
    c = find_shared_prefixes(tables, lens, BS, min_group=2, min_tokens=8)
    assert c.num_shared_groups == 1 and c.prefix_lens.tolist() == [12, 0]
    assert sorted(c.group_rows[3:].tolist()) == [1, 3, 5]


def test_common_run_is_the_whole_groups():
    # One row with the same first block but a different second block cuts the whole group's prefix to one block.
    tables = np.stack([_table(1, 2, 3, 10), _table(1, 2, 3, 11), _table(1, 5, 3, 12)])
    c = find_shared_prefixes(tables, np.full(3, 15), BS, min_group=2, min_tokens=4)
    assert c.prefix_lens.tolist() == [4]


def test_prefix_is_capped_below_the_shortest_member():
    # Forked sequences: identical tables (stale entries past the shortest context included). A prefix swallowing
    # row 1's whole context (8 tokens = 2 blocks) would leave it no token of its own: the cap keeps 1 block.
    tables = np.stack([_table(1, 2, 3, 4)] * 3)
    c = find_shared_prefixes(tables, np.array([16, 8, 13]), BS, min_group=2, min_tokens=4)
    assert c.prefix_lens.tolist() == [4]
    assert c.suffix_lens.tolist() == [12, 4, 9]
    # One more token in row 1 and the cap moves past its second block.
    c = find_shared_prefixes(tables, np.array([16, 9, 13]), BS, min_group=2, min_tokens=4)
    assert c.prefix_lens.tolist() == [8]
    assert c.suffix_lens.min() >= 1
    # A one-token member caps the group at nothing.
    assert find_shared_prefixes(tables, np.array([16, 1, 13]), BS, min_group=2, min_tokens=1) is None


def test_groups_past_the_cap_decode_unshared():
    # Five groups of rows x shared blocks 2x3, 4x1, 3x2, 2x1, 5x1 = 6, 4, 6, 2, 5: with room for 3, the first, third
    # and fifth keep their prefix, the other two join the row that shares nothing, with their whole tables.
    rows = [(1, 2, 3)] * 2 + [(4,)] * 4 + [(5, 6)] * 3 + [(7,)] * 2 + [(8,)] * 5
    tables = np.stack([_table(*r, 50 + i) for i, r in enumerate(rows)] + [_table(9, 70)])
    lens = np.full(len(tables), 4 * BS)
    c = find_shared_prefixes(tables, lens, BS, min_group=2, min_tokens=1, max_groups=3)
    assert c.num_shared_groups == 3
    assert c.prefix_lens.tolist() == [3 * BS, 2 * BS, BS, 0]
    groups = [sorted(c.group_rows[a:b].tolist()) for a, b in zip(c.group_query_start[:-1], c.group_query_start[1:])]
    assert groups == [[0, 1], [6, 7, 8], list(range(11, 16)), [2, 3, 4, 5, 9, 10, 16]]
    assert (c.suffix_lens[[2, 9, 16]] == 4 * BS).all()
    assert c.suffix_tables[9, :2].tolist() == [7, 59]
    assert MAX_CASCADE_GROUPS == 4
    assert find_shared_prefixes(tables, lens, BS, min_group=2, min_tokens=1).num_shared_groups == 4


def test_cascade_graph_ladder():
    # Coarser than the ordinary ladder (it costs a logits buffer and a capture per size); never below the rows
    # one shared group needs, always ending at max_num_seqs.
    assert cascade_bucket_sizes(512, 8) == [8, 16, 32, 64, 128, 192, 256, 384, 512]
    assert cascade_bucket_sizes(300, 8) == [8, 16, 32, 64, 128, 192, 256, 300]
    assert cascade_bucket_sizes(64, 12) == [16, 32, 64]
    assert cascade_bucket_sizes(10, 8) == [8, 10]
    assert cascade_bucket_sizes(6, 8) == []


def test_metadata_moves_to_the_device_as_int32():
    tables = np.stack([_table(1, 2, 30 + i) for i in range(3)])
    c = find_shared_prefixes(tables, np.full(3, 10), BS, min_group=2, min_tokens=4)
    names = []
    d = c.to_device(lambda a, dtype, name: names.append(name) or torch.from_numpy(np.ascontiguousarray(a)).to(dtype))
    assert all(t.dtype == torch.int32 for t in (d.group_rows, d.prefix_tables, d.suffix_tables, d.suffix_lens))
    assert len(set(names)) == 6 and d.max_prefix_len == c.max_prefix_len


# --- engine -------------------------------------------------------------------------------------------------


def _shared_prompts(n, prefix_len, seed):
    rng = random.Random(seed)
    prefix = [rng.randrange(500) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(500) for _ in range(rng.randint(1, 20))] for _ in range(n)]


def _greedy(llm, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where there is no GPU (conftest); "
                    "test_cascade_graphs_greedy_equals_ordinary_on_the_gpu covers this there")
def test_cascade_steps_match_ordinary_ones_on_the_cpu(tiny_model_dir, monkeypatch):
    # Triton through the interpreter; thresholds lowered so that 6 requests behind a 40-token prompt qualify.
    # Eager cascade steps, then the graph path with graphs that re-run their forward (static buffers, 6 rows padded
    # to the cascade bucket of 8), then ordinary steps on the same path: all three agree.
    monkeypatch.setattr(model_runner, "CASCADE_MIN_GROUP", 2)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_PREFIX_TOKENS", 16)
    prompts = _shared_prompts(6, 40, seed=3)
    llm = LLM(engine_config(tiny_model_dir, attention_backend="triton", max_num_batched_tokens=512))
    runner = llm.engine.runner
    assert runner.cascade_enabled and runner.graphs is None
    _greedy(llm, prompts[:1], 1)  # puts the shared prompt's blocks in the prefix cache
    cascade = _greedy(llm, prompts, 4)
    assert runner.cascade_steps > 0 and runner.cascade_graph_steps == 0

    runner.graphs = _EagerGraphs(runner.model, runner.kv_caches, runner.config.max_num_seqs,
                                 runner.max_blocks_per_seq, runner.max_model_len, runner.device, cascade_min_rows=2)
    assert runner.graphs.cascade_sizes == [8]
    steps = runner.cascade_steps
    graphed = _greedy(llm, prompts, 4)
    assert runner.cascade_graph_steps == runner.cascade_steps - steps > 0

    runner.cascade_enabled = False
    steps = runner.cascade_steps
    ordinary = _greedy(llm, prompts, 4)
    assert runner.cascade_steps == steps
    assert cascade == graphed == ordinary


class _EagerGraphs(DecodeGraphs):
    """Graphs whose replay re-runs the captured forward: the static buffers, padding and bucket choice of the graph
    path, without CUDA."""

    def _capture(self, forward, device):
        logits = forward()
        return SimpleNamespace(replay=lambda: logits.copy_(forward())), logits


def _compiled_cascade_variants():
    """Compiled variants of the cascade prefix kernel and the merge (in these runs only cascade steps and graph
    captures launch it), from Triton's per-device kernel caches."""
    from gpt2serve.kernels.cascade_attention import _cascade_prefix_kernel
    from gpt2serve.kernels.paged_attention import _merge_splits_kernel

    return {k.__name__: sum(len(cache[0]) for cache in k.device_caches.values())
            for k in (_cascade_prefix_kernel, _merge_splits_kernel)}


def _many_groups_run(tiny_model_dir, monkeypatch, enabled, **overrides):
    """Six 320-token prompts with 10 requests behind each (more groups than a cascade graph holds: the four that
    save most share, the rest decode unshared), then one n=12 request whose samples share a 330-token prompt."""
    widest = []

    def spy(*args, **kwargs):
        c = find_shared_prefixes(*args, **kwargs)
        widest.append(c.num_shared_groups if c is not None else 0)
        return c

    monkeypatch.setattr(model_runner, "find_shared_prefixes", spy)
    groups = [_shared_prompts(10, 320, seed=10 + g) for g in range(6)]
    settings = dict(device="cuda", attention_backend="triton", dtype="float32", num_gpu_blocks=4096,
                    max_num_seqs=64, max_num_batched_tokens=1024)
    llm = LLM(engine_config(tiny_model_dir, **{**settings, **overrides}))
    runner = llm.engine.runner
    runner.cascade_enabled = enabled
    _greedy(llm, [g[0] for g in groups], 1)  # the shared prompts' blocks into the prefix cache
    compiled = _compiled_cascade_variants()
    greedy = _greedy(llm, [p for g in groups for p in g], 24)
    rng = random.Random(6)
    forked = [rng.randrange(500) for _ in range(330)]
    params = SamplingParams(n=12, max_tokens=24, temperature=0, ignore_eos=True)
    samples = [s.token_ids for s in llm.generate(prompt_token_ids=[forked], sampling_params=params)[0].outputs]
    assert llm.engine.kv.all_free()
    if enabled:
        assert runner.cascade_steps > 0 and max(widest) == MAX_CASCADE_GROUPS
        assert _compiled_cascade_variants() == compiled, "a cascade step compiled a kernel after start-up"
    else:
        assert runner.cascade_steps == 0
    return greedy, samples, runner


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cascade_graphs_greedy_equals_ordinary_on_the_gpu(tiny_model_dir, monkeypatch):
    # fp32, as the other engine-level GPU comparisons: greedy choices are then exact enough to agree. Cascade steps
    # replay their own graphs (none of them falls back to eager) and compile nothing.
    greedy, samples, runner = _many_groups_run(tiny_model_dir, monkeypatch, True)
    assert runner.graphs.cascade_sizes == [8, 16, 32, 64]
    assert runner.cascade_graph_steps == runner.cascade_steps > 0
    assert (greedy, samples) == _many_groups_run(tiny_model_dir, monkeypatch, False)[:2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_cascade_steps_are_warmed_up_and_equal_ordinary_ones(tiny_model_dir, monkeypatch):
    # enforce_eager: cascade steps run eagerly, on the variants the start-up warm-up compiled.
    greedy, samples, runner = _many_groups_run(tiny_model_dir, monkeypatch, True, enforce_eager=True)
    assert runner.graphs is None and runner.cascade_graph_steps == 0
    assert (greedy, samples) == _many_groups_run(tiny_model_dir, monkeypatch, False, enforce_eager=True)[:2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cascade_graphs_in_fp16(tiny_model_dir, monkeypatch):
    # fp16 rounds the prefix pass's probabilities before its tensor-core PV product, so a near-tie can flip a greedy
    # choice and everything after it: most sequences, not all, must match.
    on, _, runner = _many_groups_run(tiny_model_dir, monkeypatch, True, dtype="float16")
    assert runner.cascade_graph_steps == runner.cascade_steps > 0
    off = _many_groups_run(tiny_model_dir, monkeypatch, False, dtype="float16")[0]
    assert sum(a == b for a, b in zip(on, off)) >= 0.8 * len(on)
