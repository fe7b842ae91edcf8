"""Paged attention in Triton (same semantics as ``paged_attention_ref``).

One kernel, ``_paged_attn_kernel``, serves every step: each program owns one head and a tile of ``BLOCK_M`` new
tokens of one sequence and walks that sequence's context ``BLOCK_N`` keys at a time through its block table, with
a flash-attention online softmax accumulated in fp32. Two compile-time shapes of it are used:

* ``BLOCK_M >= 16`` (prefill chunks and mixed steps): QK^T and PV on the tensor cores with ``tl.dot``. Programs are
  laid out over ``T // BLOCK_M + B`` tile slots and each finds its sequence by binary search over
  ``query_start_loc``, so a mixed batch needs no host-side bookkeeping (and no device->host sync).
* ``BLOCK_M == 1`` (decode-only steps): one token per sequence, so a dot would waste 15/16 of an MMA tile.
  The scores and the PV product are broadcast-multiply-and-sum on the CUDA cores instead, and each of the
  ``BLOCK_N`` key lanes keeps its own running max/sum and a row of a ``[BLOCK_N, D]`` register accumulator, so
  the loop needs no cross-warp reduction at all; lanes are merged once, after the loop. Decode is bandwidth
  bound, and this keeps the loop to vectorised loads, converts and FMAs.

Split-K ("flash decoding"): with few sequences there are too few (token, head) programs to keep the GPU's memory
system busy, so grid axis 2 cuts each context into ``num_splits`` ranges of KV tiles; each program writes its
partial (max, sum, unnormalised acc) in fp32 and ``_merge_splits_kernel`` combines them. Scores are kept in log2
units (``qk_scale`` folds in log2(e)) so the kernels use ``exp2``. Cascade attention (``cascade_attention.py``)
reuses the decode path and the merge for the part of each context that is not shared with other sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# Tunables, module-level so benchmarks/kernels_gpu.py can sweep them. block_n = keys per loop iteration;
# block_m_max caps the query-tile height of the tl.dot path.
DECODE_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 2}
PREFILL_CONFIG = {"block_m_max": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
# fp32 pools (GPU tests only) take the non-tensor-core "ieee" dot, which spills at 64x64 tiles.
PREFILL_CONFIG_FP32 = {"block_m_max": 32, "block_n": 32, "num_warps": 4, "num_stages": 1}
# Split-K: aim for this many programs per SM, and give each split at least this many keys.
SPLIT_TARGET_PROGRAMS_PER_SM = 4
SPLIT_MIN_KEYS = 128
SPLIT_MAX = 16


@triton.jit
def _kv_rows(bt_row_ptr, pos, kv_end, stride_blk, stride_tok, BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr):
    """Offsets (in elements, int64) of the pool rows holding context positions ``pos``, and which are valid."""
    valid = pos < kv_end
    if MASK:
        blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
    else:
        blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE)
    # int64: a per-layer pool can exceed 2**31 elements on an 80 GB card.
    return blk.to(tl.int64) * stride_blk + (pos % BLOCK_SIZE) * stride_tok, valid


@triton.jit
def _decode_tiles(q, m_vec, l_vec, acc, k_head_ptr, v_head_ptr, bt_row_ptr, tile_lo, tile_hi, kv_end,
                  stride_blk, stride_tok,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Single-query online softmax, kept separately for each of the BLOCK_N key lanes (lane n sees keys
    n, n + BLOCK_N, ...). Lanes never talk to each other inside the loop, so there is no cross-warp reduction
    (shared memory + barrier) per tile; the caller folds the lanes together once at the end."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for j in range(tile_lo, tile_hi):
        pos = j * BLOCK_N + offs_n
        rows, valid = _kv_rows(bt_row_ptr, pos, kv_end, stride_blk, stride_tok, BLOCK_SIZE, MASK)
        offs = rows[:, None] + offs_d[None, :]
        if MASK:
            k = tl.load(k_head_ptr + offs, mask=valid[:, None], other=0.0)
            v = tl.load(v_head_ptr + offs, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_head_ptr + offs)
            v = tl.load(v_head_ptr + offs)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if MASK:
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_vec, s)
        if MASK:
            # A lane may have seen no key yet (context shorter than BLOCK_N): avoid (-inf) - (-inf).
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        alpha = tl.exp2(m_vec - m_ref)
        p = tl.exp2(s - m_ref)
        l_vec = l_vec * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_vec = m_new
    return m_vec, l_vec, acc


@triton.jit
def _prefill_tiles(q, m_i, l_i, acc, q_pos, k_head_ptr, v_head_ptr, bt_row_ptr, tile_lo, tile_hi, kv_end, qk_scale,
                   stride_blk, stride_tok,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for j in range(tile_lo, tile_hi):
        pos = j * BLOCK_N + offs_n
        rows, valid = _kv_rows(bt_row_ptr, pos, kv_end, stride_blk, stride_tok, BLOCK_SIZE, MASK)
        offs = rows[:, None] + offs_d[None, :]
        if MASK:
            k = tl.load(k_head_ptr + offs, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_head_ptr + offs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK:
            visible = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Under split-K a row can see no key of a whole tile range; keep exp2 away from (-inf) - (-inf).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASK:
            v = tl.load(v_head_ptr + offs, mask=valid[:, None], other=0.0)
        else:
            v = tl.load(v_head_ptr + offs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _find_seq(qsl_ptr, num_seqs, tile, BLOCK_M: tl.constexpr):
    """Sequence owning tile slot ``tile``: the last b with query_start_loc[b] // BLOCK_M + b <= tile.

    Sequence b gets slots [qsl[b] // BLOCK_M + b, qsl[b+1] // BLOCK_M + b + 1), at least cdiv(q_len, BLOCK_M)
    of them, and the key is monotonic in b, so T // BLOCK_M + B slots cover every batch.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Integers that change from step to step are not specialised: the batch's sequence and token counts, and the
# block-table width (the step's longest context, in blocks). Triton would compile a variant for each of == 1, a
# multiple of 16 and neither, in the middle of a served step whenever the warm-up had not met that case (it met no
# table width of 16, 32, ... blocks). None of them feeds an address the compiler could vectorise (block-table
# entries are gathered), so the common path loses nothing.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "stride_bt"])
def _paged_attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    block_tables_ptr, seq_lens_ptr, qsl_ptr,
    num_seqs, num_tokens, num_heads, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_blk, stride_tok, stride_kh,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, WRITE_PARTIALS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # WRITE_PARTIALS: store (max, sum, acc) for a merge kernel instead of the normalised output. Split-K needs it;
    # cascade attention (kernels/cascade_attention.py) also needs it with one split, since its merge adds the
    # shared-prefix partial.
    head = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    if BLOCK_M == 1:
        # Decode-only launch: one token per sequence, one tile slot per sequence.
        seq = tile
        q_block = 0
    else:
        seq = _find_seq(qsl_ptr, num_seqs, tile, BLOCK_M)
        q_block = tile - (tl.load(qsl_ptr + seq) // BLOCK_M + seq)
    # Issued together, before the branch, so their latencies overlap.
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    if q_block * BLOCK_M >= q_len:
        return
    ctx_start = seq_len - q_len  # position of the sequence's first new token

    offs_d = tl.arange(0, HEAD_DIM)
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_cache_ptr + head * stride_kh
    v_head_ptr = v_cache_ptr + head * stride_kh

    if BLOCK_M == 1:
        tok = q_start
        q = tl.load(q_ptr + tok.to(tl.int64) * stride_qt + head * stride_qh + offs_d).to(tl.float32) * qk_scale
        kv_end = seq_len
        n_full = kv_end // BLOCK_N
    else:
        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        tok = q_start + offs_m
        q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0).to(k_cache_ptr.dtype.element_ty)
        q_pos = ctx_start + offs_m
        kv_end = ctx_start + tl.minimum((q_block + 1) * BLOCK_M, q_len)
        # Tiles below the tile's first query position are visible to all its rows: no causal mask needed.
        n_full = (ctx_start + q_block * BLOCK_M + 1) // BLOCK_N

    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    mid = tl.maximum(tl.minimum(n_full, tile_hi), tile_lo)

    if BLOCK_M == 1:
        m_vec = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        l_vec = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        m_vec, l_vec, acc2 = _decode_tiles(q, m_vec, l_vec, acc2, k_head_ptr, v_head_ptr, bt_row_ptr, tile_lo, mid,
                                           kv_end, stride_blk, stride_tok, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False)
        m_vec, l_vec, acc2 = _decode_tiles(q, m_vec, l_vec, acc2, k_head_ptr, v_head_ptr, bt_row_ptr, mid, tile_hi,
                                           kv_end, stride_blk, stride_tok, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True)
        # Fold the key lanes together. m_i is -inf only for an empty split (stored as such, with l = 0).
        m_i = tl.max(m_vec, axis=0)
        w = tl.exp2(m_vec - tl.where(m_i == float("-inf"), 0.0, m_i))
        l_i = tl.sum(l_vec * w, axis=0)
        acc = tl.sum(acc2 * w[:, None], axis=0)
        if not WRITE_PARTIALS:
            # l_i == 0 only for a row with no context at all (e.g. CUDA-graph padding with seq_len 0): emit zeros
            # there rather than NaN.
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)
            tl.store(out_ptr + tok.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
                     out.to(out_ptr.dtype.element_ty))
        else:
            part = (split * num_tokens + tok) * num_heads + head
            tl.store(part_m_ptr + part, m_i)
            tl.store(part_l_ptr + part, l_i)
            tl.store(part_acc_ptr + part.to(tl.int64) * HEAD_DIM + offs_d, acc)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i, l_i, acc = _prefill_tiles(q, m_i, l_i, acc, q_pos, k_head_ptr, v_head_ptr, bt_row_ptr, tile_lo, mid,
                                       kv_end, qk_scale, stride_blk, stride_tok,
                                       HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
        m_i, l_i, acc = _prefill_tiles(q, m_i, l_i, acc, q_pos, k_head_ptr, v_head_ptr, bt_row_ptr, mid, tile_hi,
                                       kv_end, qk_scale, stride_blk, stride_tok,
                                       HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)
        if not WRITE_PARTIALS:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            part = (split * num_tokens + tok) * num_heads + head
            tl.store(part_m_ptr + part, m_i, mask=row_ok)
            tl.store(part_l_ptr + part, l_i, mask=row_ok)
            tl.store(part_acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=row_ok[:, None])


# The split count is a run-time argument (only its power-of-two ceiling shapes the code), so split-K and cascade
# attention, whose slot counts vary with the step, share a handful of compiled variants.
@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _merge_splits_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr,
    num_tokens, num_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_POW2: tl.constexpr,
):
    head = tl.program_id(0)
    tok = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    part = (offs_s * num_tokens + tok) * num_heads + head
    m = tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None],
                  other=0.0)
    # Empty splits (m = -inf) get weight 0. All splits are empty only for a row with no context (seq_len 0
    # padding): guard both the max and the division so that row comes out as zeros, not NaN.
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    l_tot = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(out_ptr + tok.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_num_splits(num_seqs: int, num_heads: int, max_query_len: int, max_seq_len: int,
                       device: torch.device) -> int:
    """Split-K only for decode-only steps whose (sequence, head) programs cannot fill the GPU.

    Enough programs to put ``SPLIT_TARGET_PROGRAMS_PER_SM`` on every SM, but never fewer than
    ``SPLIT_MIN_KEYS`` keys per split (below that the merge and the per-program setup cost more than they hide).
    On the CPU (interpreter) splitting only adds work.
    """
    if device.type != "cuda" or max_query_len != 1:
        return 1
    programs = num_seqs * num_heads
    want = triton.cdiv(SPLIT_TARGET_PROGRAMS_PER_SM * _sm_count(device), max(programs, 1))
    return max(1, min(want, max_seq_len // SPLIT_MIN_KEYS, SPLIT_MAX))


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, H, D], already holding the new tokens' K/V
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new tokens
    query_start_loc: torch.Tensor,  # [B + 1] int32
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context; returns [T, H, D] in q.dtype.

    ``num_splits`` overrides the split-K heuristic (``default_num_splits``); 1 disables it. It is honoured for
    any batch, though the heuristic only splits decode-only steps.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, pool_heads, pool_dim = kv_cache.shape
    assert (pool_heads, pool_dim) == (num_heads, head_dim), "q and the pool disagree on heads/head_dim"
    assert kv_cache.is_contiguous(), "the pool layout is [2, num_blocks, block_size, H, D], contiguous"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert block_tables.stride(1) == 1 and seq_lens.is_contiguous() and query_start_loc.is_contiguous()
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if q.stride(2) != 1:
        q = q.contiguous()
    if num_tokens == 0 or num_seqs == 0:
        return out

    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_heads, max_query_len, max_seq_len, q.device)
    num_splits = max(1, int(num_splits))

    if max_query_len == 1:
        block_m, cfg = 1, DECODE_CONFIG
        num_tiles = num_seqs
    else:
        cfg = PREFILL_CONFIG_FP32 if kv_cache.dtype == torch.float32 else PREFILL_CONFIG
        # Query tiles no taller than the longest chunk (16 = the smallest MMA tile): when every sequence has
        # few new tokens, decodes riding in a prefill step do not pay for a 64-row tile.
        block_m = min(max(16, triton.next_power_of_2(max_query_len)), cfg["block_m_max"])
        num_tiles = num_tokens // block_m + num_seqs

    if num_splits > 1:
        part_m = torch.empty((num_splits, num_tokens, num_heads), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused: the WRITE_PARTIALS=False specialisation never touches them

    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _paged_attn_kernel[(num_heads, num_tiles, num_splits)](
        q, k_cache, v_cache, out,
        part_m, part_l, part_acc,
        block_tables, seq_lens, query_start_loc,
        num_seqs, num_tokens, num_heads, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
        NUM_SPLITS=num_splits, WRITE_PARTIALS=num_splits > 1,
        DOT_PRECISION="ieee" if kv_cache.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_heads, num_tokens)](
            part_m, part_l, part_acc, out,
            num_tokens, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_POW2=triton.next_power_of_2(num_splits),
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out
