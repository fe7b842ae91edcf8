"""Triton paged attention / KV write vs the PyTorch reference.

On a CPU-only machine these run under the Triton interpreter, so shapes stay small. The pool handed to the
kernel has every slot outside the live contexts (and the block the unused block-table entries point at) set to
NaN, so any read past a sequence's context shows up in the output; the reference runs on the same pool with
finite values there.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpt2serve.engine.attention import AttentionMetadata  # noqa: E402
from gpt2serve.kernels.attention_ref import paged_attention_ref, write_kv_ref  # noqa: E402
from gpt2serve.kernels.kv_write import write_kv  # noqa: E402
from gpt2serve.kernels.paged_attention import default_num_splits, paged_attention  # noqa: E402
from gpt2serve.kernels.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def _cdiv(a, b):
    return -(-a // b)


def make_batch(q_lens, ctx_lens, num_heads, head_dim, block_size, dtype=torch.float32, seed=0, device=DEVICE):
    """Random paged batch: shuffled block tables, a clean pool for the reference and a NaN-poisoned twin."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(q_lens)
    blocks_per_seq = [_cdiv(c, block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 2  # one spare block nobody owns, one "junk" block
    perm = torch.randperm(num_blocks, generator=gen)
    junk = int(perm[-1])
    # Entries past a sequence's last block are meaningless; point them at the junk block (finite in the
    # reference pool, NaN in the kernel's).
    block_tables = torch.full((batch, max(blocks_per_seq) + 2), junk, dtype=torch.int32)
    valid = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    start = 0
    for b, (n, ctx) in enumerate(zip(blocks_per_seq, ctx_lens)):
        block_tables[b, :n] = perm[start:start + n].to(torch.int32)
        start += n
        pos = torch.arange(ctx)
        valid[block_tables[b, pos // block_size].long() * block_size + pos % block_size] = True

    pool = torch.randn(2, num_blocks, block_size, num_heads, head_dim, generator=gen).to(dtype)
    poisoned = pool.clone()
    poisoned.view(2, -1, num_heads, head_dim)[:, ~valid] = float("nan")
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return dict(
        q=to(q), pool=to(pool), poisoned=to(poisoned), block_tables=to(block_tables), seq_lens=to(seq_lens),
        query_start_loc=to(query_start_loc), max_query_len=max(q_lens), max_seq_len=max(ctx_lens),
        valid=to(valid),
    )


def _attn_args(batch, scale=0.125):
    return (batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], batch["max_query_len"],
            batch["max_seq_len"], scale)


def run_both(batch, scale, num_splits=None, q=None):
    q = batch["q"] if q is None else q
    args = _attn_args(batch, scale)
    ref = paged_attention_ref(q.float(), batch["pool"].float(), *args)
    out = torch.full_like(q, float("nan"))
    got = paged_attention(q, batch["poisoned"], *args, out=out, num_splits=num_splits)
    assert got is out
    return got, ref


@pytest.mark.parametrize(
    "head_dim,num_heads,block_size",
    [(64, 2, 16), (64, 3, 8), (32, 3, 16)],
)
def test_mixed_prefill_and_decode(head_dim, num_heads, block_size):
    # A decode token, short and long prefill chunks, some on top of existing context, one fresh prompt.
    q_lens = [1, 5, 17, 33]
    ctx_lens = [41, 5, 60, 97]
    batch = make_batch(q_lens, ctx_lens, num_heads, head_dim, block_size, seed=head_dim + num_heads + block_size)
    got, ref = run_both(batch, scale=head_dim ** -0.5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "q_lens,ctx_lens",
    [
        ([1, 5, 16, 2], [30, 5, 40, 17]),  # 16-row query tiles
        ([1, 70, 3, 130], [20, 90, 3, 130]),  # chunks spanning several 64-row query tiles
    ],
)
def test_query_tiling(q_lens, ctx_lens):
    batch = make_batch(q_lens, ctx_lens, 2, 64, 16, seed=sum(q_lens))
    got, ref = run_both(batch, scale=0.125)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("block_size", [8, 16])
def test_decode(num_splits, block_size):
    # Contexts shorter than one key tile, exactly on tile/block boundaries, and spanning several tiles.
    ctx_lens = [1, 7, 64, 65, 100, 128]
    batch = make_batch([1] * len(ctx_lens), ctx_lens, 3, 64, block_size, seed=num_splits * 10 + block_size)
    got, ref = run_both(batch, scale=0.125, num_splits=num_splits)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_padding_row_with_empty_context(num_splits):
    # CUDA-graph padding may hand the kernel a sequence with seq_len 0: its row must come out finite (zeros)
    # and must not disturb the others. (The reference gives NaN there, so only the real rows are compared.)
    batch = make_batch([1, 1, 1], [30, 1, 70], 2, 64, 16, seed=21 + num_splits)
    batch["seq_lens"][1] = 0
    out = torch.full_like(batch["q"], float("nan"))
    got = paged_attention(batch["q"], batch["poisoned"], *_attn_args(batch), out=out, num_splits=num_splits)
    ref = paged_attention_ref(batch["q"], batch["pool"], *_attn_args(batch))
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got[[0, 2]], ref[[0, 2]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [2, 3])
def test_split_k_mixed_batch(num_splits):
    # Split-K is only picked automatically for decode, but the kernel supports it for prefill rows too
    # (rows whose keys all fall in another split must come out as an empty partial, not NaN).
    batch = make_batch([1, 17, 33], [80, 17, 90], 2, 64, 16, seed=100 + num_splits)
    got, ref = run_both(batch, scale=0.125, num_splits=num_splits)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [1, 32])
def test_other_block_sizes(block_size):
    batch = make_batch([1, 9, 1], [30, 40, 70], 2, 32, block_size, seed=block_size)
    got, ref = run_both(batch, scale=0.2)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_strided_query_view():
    # q as the engine gets it from a fused qkv projection: a view with token stride 3*H*D.
    batch = make_batch([3, 1, 20], [10, 50, 20], 2, 64, 16, seed=7)
    qkv = torch.randn(batch["q"].shape[0], 3, 2, 64, device=DEVICE)
    got, ref = run_both(batch, scale=0.125, q=qkv[:, 0])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_fp16_under_fp32_reference():
    batch = make_batch([1, 5, 17, 1], [33, 40, 17, 9], 2, 64, 16, dtype=torch.float16, seed=11)
    got, ref = run_both(batch, scale=0.125)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref.float(), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_bf16_decode(num_splits):
    # Decode only: the Triton 3.9 interpreter's bf16 tl.dot is broken, so the prefill (dot) path's bf16
    # coverage lives in the GPU tests.
    batch = make_batch([1, 1, 1], [33, 70, 5], 2, 64, 16, dtype=torch.bfloat16, seed=12)
    got, ref = run_both(batch, scale=0.125, num_splits=num_splits)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=1e-2, rtol=1e-2)


def _slot_mapping(batch, block_size, num_pad):
    """Slots of every sequence's new tokens, plus ``num_pad`` padding tokens (slot -1) at the end."""
    bt = batch["block_tables"].cpu().long()
    slots = []
    for b in range(bt.shape[0]):
        ctx = int(batch["seq_lens"][b])
        q_len = int(batch["query_start_loc"][b + 1] - batch["query_start_loc"][b])
        pos = torch.arange(ctx - q_len, ctx)
        slots.append(bt[b, pos // block_size] * block_size + pos % block_size)
    slots.append(torch.full((num_pad,), -1, dtype=torch.long))
    return torch.cat(slots).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_skips_padding(dtype):
    num_heads, head_dim, block_size = 3, 32, 8
    batch = make_batch([2, 5], [10, 20], num_heads, head_dim, block_size, dtype=dtype, seed=3)
    slot_mapping = _slot_mapping(batch, block_size, num_pad=3)
    num_tokens = slot_mapping.shape[0]
    # k/v as strided views of one fused projection output, like the model produces them.
    qkv = torch.randn(num_tokens, 3, num_heads, head_dim, device=DEVICE).to(dtype)
    k, v = qkv[:, 1], qkv[:, 2]
    expected = batch["pool"].clone()
    write_kv_ref(k, v, expected, slot_mapping)
    got = batch["pool"].clone()
    write_kv(k, v, got, slot_mapping)
    assert torch.equal(got, expected)  # the -1 tokens touched nothing


def test_backend_forward_writes_then_attends():
    num_heads, head_dim, block_size = 2, 64, 16
    q_lens, ctx_lens = [1, 6, 1, 19], [37, 6, 16, 50]
    batch = make_batch(q_lens, ctx_lens, num_heads, head_dim, block_size, seed=5)
    slot_mapping = _slot_mapping(batch, block_size, num_pad=0)
    num_tokens = slot_mapping.shape[0]
    k = torch.randn(num_tokens, num_heads, head_dim, device=DEVICE)
    v = torch.randn(num_tokens, num_heads, head_dim, device=DEVICE)
    # The new tokens' slots start out poisoned too: the backend must write them before it reads them.
    batch["poisoned"].view(2, -1, num_heads, head_dim)[:, slot_mapping] = float("nan")
    meta = AttentionMetadata(
        slot_mapping=slot_mapping, query_start_loc=batch["query_start_loc"], seq_lens=batch["seq_lens"],
        block_tables=batch["block_tables"], max_query_len=max(q_lens), max_seq_len=max(ctx_lens),
    )
    backend = TritonAttentionBackend()
    assert backend.name == "triton"
    got = backend.forward(batch["q"], k, v, batch["poisoned"], meta, 0.125)
    write_kv_ref(k, v, batch["pool"], slot_mapping)
    ref = paged_attention_ref(batch["q"], batch["pool"], batch["block_tables"], batch["seq_lens"],
                              batch["query_start_loc"], max(q_lens), max(ctx_lens), 0.125)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_split_heuristic(monkeypatch):
    import gpt2serve.kernels.paged_attention as pa

    monkeypatch.setitem(pa._SM_COUNT, 0, 132)
    gpu = torch.device("cuda", 0)
    assert default_num_splits(1, 25, 1, 1024, gpu) > 1  # one long decode: split
    assert default_num_splits(1, 25, 1, 100, gpu) == 1  # too short to be worth it
    assert default_num_splits(256, 25, 1, 512, gpu) == 1  # enough (sequence, head) programs already
    assert default_num_splits(1, 25, 512, 1024, gpu) == 1  # prefill: never by default
    assert default_num_splits(1, 25, 1, 1024, torch.device("cpu")) == 1


# --- real shapes, GPU only ----------------------------------------------------------------------------------

XL_HEADS, XL_DIM = 25, 64


def _check_gpu(q_lens, ctx_lens, dtype, num_splits=None, seed=0):
    batch = make_batch(q_lens, ctx_lens, XL_HEADS, XL_DIM, 16, dtype=dtype, seed=seed)
    got, ref = run_both(batch, scale=XL_DIM ** -0.5, num_splits=num_splits)
    assert not got.isnan().any()
    # p is rounded to the 16-bit dtype for the PV tensor-core dot, and the output once more on the way out.
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_batch256_ctx512(dtype):
    _check_gpu([1] * 256, [512] * 256, dtype)


@needs_gpu
@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_long_context(dtype, num_splits):
    _check_gpu([1, 1], [1024, 777], dtype, num_splits=num_splits, seed=1)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_prefill_chunk_512(dtype):
    # A fresh 512-token prompt and a 512-token chunk on top of 700 tokens of context, plus decodes.
    _check_gpu([512, 512, 1, 1], [512, 1212, 300, 1000], dtype, seed=2)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_write_kv(dtype):
    batch = make_batch([512, 1], [600, 40], XL_HEADS, XL_DIM, 16, dtype=dtype, seed=4)
    slot_mapping = _slot_mapping(batch, 16, num_pad=7)
    k = torch.randn(slot_mapping.shape[0], XL_HEADS, XL_DIM, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    expected = batch["pool"].clone()
    write_kv_ref(k, v, expected, slot_mapping)
    write_kv(k, v, batch["pool"], slot_mapping)
    assert torch.equal(batch["pool"], expected)
