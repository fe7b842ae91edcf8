"""Cascade attention (shared prefix + own suffix + merge) vs ordinary paged attention and the PyTorch reference.

Under the Triton interpreter on a CPU-only machine, so shapes stay small. As in test_paged_attention.py, the pool
the kernels read has every slot outside the live contexts (and the junk block unused table entries point at) set
to NaN, and outputs start as NaN, so a read past a context or a row nobody writes shows up.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpt2serve.engine.attention import MAX_CASCADE_GROUPS, AttentionMetadata, find_shared_prefixes  # noqa: E402
from gpt2serve.engine.cuda_graphs import CascadeBuffers  # noqa: E402
from gpt2serve.kernels.attention_ref import paged_attention_ref, write_kv_ref  # noqa: E402
from gpt2serve.kernels import cascade_attention as ca  # noqa: E402
from gpt2serve.kernels.cascade_attention import cascade_attention  # noqa: E402
from gpt2serve.kernels.paged_attention import paged_attention  # noqa: E402
from gpt2serve.kernels.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def _cdiv(a, b):
    return -(-a // b)


def make_shared_batch(groups, loners, num_heads, head_dim, block_size, dtype=torch.float32, seed=0):
    """A decode batch where each group ``(prefix_blocks, [suffix_len of each member])`` shares its first blocks and
    each loner (a context length) shares nothing. Rows are shuffled so groups are not contiguous in the batch."""
    gen = torch.Generator().manual_seed(seed)
    rows = []  # (prefix block ids, own block count, context length)
    num_blocks = 0
    for prefix_blocks, suffixes in groups:
        prefix = list(range(num_blocks, num_blocks + prefix_blocks))
        num_blocks += prefix_blocks
        for s in suffixes:
            assert s >= 1, "every member keeps at least one token of its own"
            rows.append((prefix, _cdiv(s, block_size), prefix_blocks * block_size + s))
    for ctx in loners:
        rows.append(([], _cdiv(ctx, block_size), ctx))
    own_total = sum(n for _, n, _ in rows)
    num_blocks_total = num_blocks + own_total + 1
    perm = torch.randperm(num_blocks_total, generator=gen)  # logical block id -> pool block
    junk = int(perm[-1])
    order = torch.randperm(len(rows), generator=gen).tolist()
    width = max(len(p) + n for p, n, _ in rows) + 2
    tables = np.full((len(rows), width), junk, dtype=np.int32)
    ctx_lens = np.zeros(len(rows), dtype=np.int64)
    next_own = num_blocks
    for b, i in enumerate(order):
        prefix, n_own, ctx = rows[i]
        ids = prefix + list(range(next_own, next_own + n_own))
        next_own += n_own
        tables[b, :len(ids)] = perm[ids].numpy()
        ctx_lens[b] = ctx

    valid = torch.zeros(num_blocks_total * block_size, dtype=torch.bool)
    for b in range(len(rows)):
        pos = np.arange(ctx_lens[b])
        valid[torch.from_numpy(tables[b, pos // block_size].astype(np.int64) * block_size + pos % block_size)] = True
    pool = torch.randn(2, num_blocks_total, block_size, num_heads, head_dim, generator=gen).to(dtype)
    poisoned = pool.clone()
    poisoned.view(2, -1, num_heads, head_dim)[:, ~valid] = float("nan")
    q = torch.randn(len(rows), num_heads, head_dim, generator=gen).to(dtype)
    return dict(
        q=q.to(DEVICE), pool=pool.to(DEVICE), poisoned=poisoned.to(DEVICE), tables=tables, ctx_lens=ctx_lens,
        block_tables=torch.from_numpy(tables).to(DEVICE), seq_lens=torch.from_numpy(ctx_lens).to(DEVICE, torch.int32),
        query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32, device=DEVICE),
        max_seq_len=int(ctx_lens.max()), block_size=block_size,
    )


def _to_dev(array, dtype, name):
    return torch.from_numpy(np.ascontiguousarray(array)).to(DEVICE, dtype)


def plan(batch, min_group=2, min_tokens=1, max_groups=MAX_CASCADE_GROUPS):
    c = find_shared_prefixes(batch["tables"], batch["ctx_lens"], batch["block_size"], min_group, min_tokens,
                             max_groups)
    assert c is not None
    return c.to_device(_to_dev)


def run_cascade(batch, c, scale, num_splits=1, prefix_splits=None):
    out = torch.full_like(batch["q"], float("nan"))
    got = cascade_attention(
        batch["q"], batch["poisoned"], batch["query_start_loc"], c.prefix_tables, c.prefix_lens,
        c.group_query_start, c.group_rows, c.suffix_tables, c.suffix_lens, c.max_group_size, c.max_prefix_len,
        c.max_suffix_len, scale, out=out, num_splits=num_splits, prefix_splits=prefix_splits,
    )
    assert got is out
    return got


def check(batch, scale=0.125, num_splits=1, prefix_splits=None, atol=1e-4):
    c = plan(batch)
    got = run_cascade(batch, c, scale, num_splits, prefix_splits)
    args = (batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], 1, batch["max_seq_len"], scale)
    ref = paged_attention_ref(batch["q"].float(), batch["pool"].float(), *args)
    ordinary = paged_attention(batch["q"], batch["poisoned"], *args, num_splits=num_splits)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(got.float(), ordinary.float(), atol=atol, rtol=atol)
    return c


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_size", [8, 16])
def test_one_group_covers_every_row(block_size, num_splits):
    # Suffixes of 1 token, exactly one block, and several blocks (the split-K suffix pass sees all of them).
    batch = make_shared_batch([(3, [1, 5, block_size, block_size + 1, 3 * block_size + 7])], [], 2, 64, block_size,
                              seed=block_size + num_splits)
    c = check(batch, num_splits=num_splits)
    assert c.num_shared_groups == 1 and c.prefix_lens.tolist() == [3 * block_size]


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("block_size", [8, 16])
def test_two_groups_and_loners(block_size, num_splits):
    # One group behind 5 blocks, one behind exactly one block, and rows that share nothing: those come out of the
    # trailing prefix-less group with an empty prefix partial.
    groups = [(5, [2, 40, 1, 17]), (1, [block_size, 3, 70])]
    batch = make_shared_batch(groups, [1, 33, 90], 3, 32, block_size, seed=7 * block_size + num_splits)
    c = check(batch, scale=32 ** -0.5, num_splits=num_splits)
    assert c.num_shared_groups == 2
    assert sorted(c.prefix_lens.tolist()) == [0, block_size, 5 * block_size]
    assert c.group_query_start.tolist()[-1] == batch["q"].shape[0]


def test_group_larger_than_one_query_tile():
    # 40 members: two query tiles of the fp32 config's 32 rows, the second one partly empty.
    suffixes = [1 + (7 * i) % 30 for i in range(40)]
    batch = make_shared_batch([(2, suffixes)], [5], 2, 32, 16, seed=3)
    c = check(batch, scale=0.2)
    assert c.max_group_size == 40


@pytest.mark.parametrize("prefix_splits", [2, 3])
def test_prefix_split_k(prefix_splits):
    # Splits of the prefix pass that get no tile (3 splits of a 2-tile prefix) must store an empty partial.
    batch = make_shared_batch([(6, [3, 20, 1]), (2, [9, 9])], [12], 2, 64, 8, seed=11 + prefix_splits)
    check(batch, num_splits=2, prefix_splits=prefix_splits)


def test_fp16_under_fp32_reference():
    batch = make_shared_batch([(4, [1, 30, 16]), (2, [5, 6, 7])], [20], 2, 64, 16, dtype=torch.float16, seed=13)
    check(batch, atol=3e-3)


def test_backend_uses_cascade_metadata():
    num_heads, head_dim, block_size = 2, 32, 8
    batch = make_shared_batch([(3, [4, 1, 9])], [7], num_heads, head_dim, block_size, seed=17)
    # This step's new token of each row: the last position of its context, written by the backend first.
    last = batch["ctx_lens"] - 1
    slots = batch["tables"][np.arange(len(last)), last // block_size].astype(np.int64) * block_size + last % block_size
    slot_mapping = torch.from_numpy(slots).to(DEVICE)
    batch["poisoned"].view(2, -1, num_heads, head_dim)[:, slot_mapping] = float("nan")
    k = torch.randn(len(last), num_heads, head_dim, device=DEVICE)
    v = torch.randn_like(k)
    meta = AttentionMetadata(slot_mapping, batch["query_start_loc"], batch["seq_lens"], batch["block_tables"], 1,
                             batch["max_seq_len"], cascade=plan(batch))
    got = TritonAttentionBackend().forward(batch["q"], k, v, batch["poisoned"], meta, 0.125)
    write_kv_ref(k, v, batch["pool"], slot_mapping)
    ref = paged_attention_ref(batch["q"], batch["pool"], batch["block_tables"], batch["seq_lens"],
                              batch["query_start_loc"], 1, batch["max_seq_len"], 0.125)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_more_groups_than_a_graph_holds_are_capped_and_exact():
    # Six groups: the MAX_CASCADE_GROUPS (4) saving the most reads (rows x shared blocks) keep their prefix, the
    # other two decode unshared in the trailing group, beside the loners.
    groups = [(4, [3, 9]), (1, [2, 5, 7]), (3, [1, 4, 6, 8]), (2, [2, 3]), (5, [7, 1, 2]), (1, [9, 9])]
    batch = make_shared_batch(groups, [6, 30], 2, 32, 8, seed=21)
    c = check(batch, num_splits=2)
    assert c.num_shared_groups == MAX_CASCADE_GROUPS
    # Saved blocks: 8, 3, 12, 4, 15, 2 -> the groups behind 5, 3, 4 and 2 blocks stay.
    assert sorted(c.prefix_lens.tolist()) == [0, 2 * 8, 3 * 8, 4 * 8, 5 * 8]
    gqs = c.group_query_start.tolist()
    assert gqs[-1] - gqs[-2] == 2 + 3 + 2  # the trailing group: two loners and the five rows of two capped groups


def _padded_rows(batch, b, seed):
    """The batch's queries followed by b - n padding rows of noise, as a graph's static input would hold them."""
    n, heads, dim = batch["q"].shape
    noise = torch.randn(b - n, heads, dim, generator=torch.Generator().manual_seed(seed)).to(batch["q"])
    return torch.cat([batch["q"], noise])


def run_graph_shaped(batch, buffers, c, b, splits, scale):
    """Cascade attention as a graph replays it: fixed-capacity metadata filled in place, b >= n rows, bucket-wide
    maxima and fixed splits; the launch itself is the same whatever the plan."""
    buffers.fill(c, b)
    meta = buffers.metadata(b, splits, max_len=4096)
    q = _padded_rows(batch, b, seed=b)
    out = torch.full_like(q, float("nan"))
    cascade_attention(
        q, batch["poisoned"], torch.arange(b + 1, dtype=torch.int32, device=DEVICE), meta.prefix_tables,
        meta.prefix_lens, meta.group_query_start, meta.group_rows, meta.suffix_tables, meta.suffix_lens,
        meta.max_group_size, meta.max_prefix_len, meta.max_suffix_len, scale, out=out,
        num_splits=meta.num_splits, prefix_splits=meta.prefix_splits,
    )
    return out


@pytest.mark.parametrize("splits", [(1, 1), (2, 3)])
def test_graph_shaped_launch_with_padding_equals_the_ordinary_kernel(splits):
    # Two plans of one batch through the same static buffers, the second one finding the first one's state (as a
    # graph's buffers do from step to step): 3 shared groups at a bucket of n + 7 rows, then the same rows capped
    # to one group at a bucket of n + 3. Unused groups are empty, padding rows sit in the trailing group.
    scale = 32 ** -0.5
    groups = [(4, [3, 9, 1]), (2, [2, 5, 7, 11]), (3, [1, 4])]
    batch = make_shared_batch(groups, [6, 21], 2, 32, 8, seed=23 + splits[1])
    n = batch["q"].shape[0]
    args = (batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], 1, batch["max_seq_len"], scale)
    ordinary = paged_attention(batch["q"], batch["poisoned"], *args)
    buffers = CascadeBuffers(n + 7, batch["tables"].shape[1], DEVICE)
    # What an earlier, larger step left behind. A padding row reads one key, at the block its stale table row
    # names: here a live one, so that its output is that key's value, exactly.
    buffers.group_rows.copy_(buffers.group_rows.flip(0))
    buffers.suffix_lens.fill_(5)
    live = int(batch["tables"][0, 0])
    buffers.suffix_tables[:, 0] = live
    for max_groups, b in ((MAX_CASCADE_GROUPS, n + 7), (1, n + 3)):
        c = plan(batch, max_groups=max_groups)
        assert c.num_shared_groups == min(3, max_groups)
        got = run_graph_shaped(batch, buffers, c, b, splits, scale)
        assert not got[:n].isnan().any()
        torch.testing.assert_close(got[:n], ordinary, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[n:], batch["pool"][1, live, 0].expand(b - n, -1, -1), atol=1e-5, rtol=1e-5)


def test_warm_up_variants_cover_every_compiled_shape(monkeypatch):
    # Whatever the split heuristics can return, the warm-up list covers every query-tile height, every suffix split
    # count (a constexpr of the decode kernel) and every power-of-two ceiling of the merge's slots. On the CPU the
    # heuristics never split: only the tile heights remain (fp32 tiles stop at 32 rows).
    cpu = torch.device("cpu")
    assert ca.warm_up_variants(25, 8, 20, 1024, torch.float32, cpu) == [(8, 1, 1), (17, 1, 1)]
    assert ca.warm_up_variants(25, 8, 4, 1024, torch.float32, cpu) == []  # batches too small to share
    monkeypatch.setattr(ca, "default_prefix_splits", lambda *a: 3)
    monkeypatch.setattr(ca, "default_num_splits", lambda *a: 5)
    variants = ca.warm_up_variants(25, 8, 512, 1024, torch.float16, cpu)
    assert {ca.query_tile_height(rows, torch.float16) for rows, _, _ in variants} == {16, 32, 64}
    assert all(8 <= rows <= 512 for rows, _, _ in variants)
    assert {s for _, _, s in variants} == set(range(1, 6))
    reachable = {ca.triton.next_power_of_2(p + s) for p in range(1, 4) for s in range(1, 6)}
    assert {ca.triton.next_power_of_2(p + s) for _, p, s in variants} == reachable


# --- real shapes, GPU only ----------------------------------------------------------------------------------

XL_HEADS, XL_DIM = 25, 64


def _check_gpu(groups, loners, dtype, num_splits=None, seed=0):
    batch = make_shared_batch(groups, loners, XL_HEADS, XL_DIM, 16, dtype=dtype, seed=seed)
    scale = XL_DIM ** -0.5
    c = plan(batch, min_group=8, min_tokens=256)
    got = run_cascade(batch, c, scale, num_splits=num_splits)
    args = (batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], 1, batch["max_seq_len"], scale)
    ref = paged_attention_ref(batch["q"].float(), batch["pool"].float(), *args)
    ordinary = paged_attention(batch["q"], batch["poisoned"], *args)
    assert not got.isnan().any()
    # p is rounded to the 16-bit dtype for the prefix pass's PV tensor-core dot, and the output once more.
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got.float(), ordinary.float(), atol=tol, rtol=tol)


def _suffixes(n, lo, hi, seed):
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_512_rows_behind_one_512_token_prefix(dtype):
    _check_gpu([(32, _suffixes(512, 64, 192, 0))], [], dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_four_groups_of_128_and_loners(dtype):
    groups = [(32, _suffixes(128, 64, 192, g)) for g in range(4)]
    _check_gpu(groups, _suffixes(20, 1, 700, 9), dtype, seed=1)


@needs_gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_few_rows_long_prefix(num_splits):
    # 8 rows behind 2,048 tokens: the prefix pass splits (few programs); the suffix pass as asked.
    _check_gpu([(128, _suffixes(8, 1, 900, 2))], [], torch.float16, num_splits=num_splits, seed=2)


@needs_gpu
def test_gpu_fp32_pool():
    # fp32 pools take CASCADE_CONFIG_FP32 and the "ieee" dot, as the engine's fp32 GPU tests run.
    _check_gpu([(20, _suffixes(40, 1, 100, 3))], [50, 7], torch.float32, seed=3)


@needs_gpu
def test_gpu_one_captured_graph_replays_any_plan_that_fits():
    # One CUDA graph of the three launches over fixed-capacity buffers (620 rows padded to 624), replayed after
    # filling in plans of 4 groups (two of the six capped), 1 group, and 4 groups again: each equals the ordinary
    # kernel on the real rows.
    from gpt2serve.kernels.cascade_attention import bucket_splits

    dtype, max_len = torch.float16, 2048
    groups = [(32, _suffixes(100, 64, 192, g)) for g in range(6)]
    batch = make_shared_batch(groups, _suffixes(20, 1, 700, 9), XL_HEADS, XL_DIM, 16, dtype=dtype, seed=4)
    scale = XL_DIM ** -0.5
    n = batch["q"].shape[0]
    b = n + 4
    buffers = CascadeBuffers(b, batch["tables"].shape[1], DEVICE)
    buffers.clear(b)
    meta = buffers.metadata(b, bucket_splits(b, XL_HEADS, max_len, dtype, torch.device(DEVICE)), max_len)
    q = _padded_rows(batch, b, seed=5)
    out = torch.empty_like(q)
    query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=DEVICE)

    def launch():
        cascade_attention(q, batch["poisoned"], query_start_loc, meta.prefix_tables, meta.prefix_lens,
                          meta.group_query_start, meta.group_rows, meta.suffix_tables, meta.suffix_lens,
                          meta.max_group_size, meta.max_prefix_len, meta.max_suffix_len, scale, out=out,
                          num_splits=meta.num_splits, prefix_splits=meta.prefix_splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    args = (batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], 1, batch["max_seq_len"], scale)
    ordinary = paged_attention(batch["q"], batch["poisoned"], *args)
    for max_groups in (MAX_CASCADE_GROUPS, 1, MAX_CASCADE_GROUPS):
        c = plan(batch, min_group=8, min_tokens=256, max_groups=max_groups)
        assert c.num_shared_groups == max_groups
        out.fill_(float("nan"))
        buffers.fill(c, b)
        graph.replay()
        torch.cuda.synchronize()
        assert not out[:n].isnan().any()
        torch.testing.assert_close(out[:n].float(), ordinary.float(), atol=4e-3, rtol=4e-3)
