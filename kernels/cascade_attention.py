"""Cascade attention: decode steps whose sequences share leading KV blocks (same result as ``paged_attention``).

With prefix caching or parallel sampling, many running sequences point at the same first blocks (a system
prompt, a shared document). The ordinary decode kernel makes each of them read those blocks again at every step,
so a batch of 512 sequences behind one 512-token prompt reads the prompt's K/V 512 times. Attention over a
context splits into any two disjoint key sets whose partial softmax results (max, sum, unnormalised acc) merge
exactly, which is what split-K already relies on. So each decode step here is three launches:

1. ``_cascade_prefix_kernel``: for each group of sequences sharing a prefix, tiles of up to ``BLOCK_M`` of the
   group's queries (one per sequence) attend to the prefix with ``tl.dot``, as prefill tiles do. Each prefix K/V
   tile is read once per query tile instead of once per sequence, and on the tensor cores. No causal mask: every
   prefix key precedes every decode query. It writes its partial into the first ``prefix_splits`` slots of the
   split-K partial buffers.
2. ``_paged_attn_kernel``, the ordinary decode path, over each sequence's suffix (its block table and length
   past its group's prefix), writing partials into the remaining slots, split-K or not.
3. ``_merge_splits_kernel`` over all the slots.

Rows that share nothing travel as one last "group" of prefix length 0: the prefix kernel stores an empty partial
(m = -inf, l = 0, acc = 0) for them, so every slot is written and the merge needs no memset or special case; their
suffix is their whole context. Building the groups is host work (``engine.attention.find_shared_prefixes``).

Everything that changes from step to step (group boundaries, rows, tables, lengths) is read from device memory and
the integer arguments that vary are not specialised, so a CUDA graph captured with fixed-capacity metadata
(``engine.cuda_graphs.CascadeBuffers``: empty groups, padding rows) replays any grouping that fits it, and eager
steps do not recompile. Only the query-tile height, the suffix pass's split count and the power of two above the
merge's slot count select compiled variants (``warm_up_variants`` lists a set of steps that compiles them all).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2serve.kernels.paged_attention import (_LOG2E, DECODE_CONFIG, SPLIT_MAX, _find_seq, _merge_splits_kernel,
                                               _paged_attn_kernel, _prefill_tiles, _sm_count, default_num_splits)

# Query-tile height: taller tiles read each prefix K/V tile fewer times (once per tile and head), shorter ones give
# more programs when groups are small. fp32 pools (interpreter, GPU tests) take the "ieee" dot, which spills at
# 64x64 tiles, as in paged_attention.PREFILL_CONFIG_FP32.
CASCADE_CONFIG = {"block_m_max": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
CASCADE_CONFIG_FP32 = {"block_m_max": 32, "block_n": 32, "num_warps": 4, "num_stages": 1}
# Split the prefix pass only when its (query tile, head) programs cannot give every SM this many, and keep at
# least this many keys per split: each split costs a fp32 [T, H, D] partial written and read back by the merge.
PREFIX_SPLIT_TARGET_PROGRAMS_PER_SM = 2
PREFIX_SPLIT_MIN_KEYS = 256


# num_groups, num_tokens and the prefix-table width change with every eager step's grouping; specialising them
# would compile new variants in the middle of served steps (an uncovered variant cost the H100 run 1.3 s).
@triton.jit(do_not_specialize=["num_groups", "num_tokens", "stride_pt"])
def _cascade_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    prefix_tables_ptr, prefix_lens_ptr, gqs_ptr, group_rows_ptr,
    num_groups, num_tokens, num_heads, qk_scale,
    stride_qt, stride_qh, stride_pt,
    stride_blk, stride_tok, stride_kh,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    # The split count is the grid's third axis rather than a constexpr: one division per program, and no compiled
    # variant per count.
    num_splits = tl.num_programs(2)
    # Groups play the part sequences play in a prefill launch (rows = their members' decode tokens), so the same
    # slot layout and binary search map a tile to its group without host bookkeeping. An empty group (graph
    # padding) owns one slot, whose program returns here.
    group = _find_seq(gqs_ptr, num_groups, tile, BLOCK_M)
    row_start = tl.load(gqs_ptr + group)
    n_rows = tl.load(gqs_ptr + group + 1) - row_start
    kv_end = tl.load(prefix_lens_ptr + group)
    q_block = tile - (row_start // BLOCK_M + group)
    if q_block * BLOCK_M >= n_rows:
        return

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_rows
    tok = tl.load(group_rows_ptr + row_start + offs_m, mask=row_ok, other=0)
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(k_cache_ptr.dtype.element_ty)
    # Every decode query comes after the whole prefix: placing each row at the prefix's last position turns the
    # shared tile loop's causal mask into the plain end-of-context mask.
    q_pos = tl.full([BLOCK_M], 0, tl.int32) + kv_end - 1

    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    mid = tl.maximum(tl.minimum(kv_end // BLOCK_N, tile_hi), tile_lo)

    bt_row_ptr = prefix_tables_ptr + group.to(tl.int64) * stride_pt
    k_head_ptr = k_cache_ptr + head * stride_kh
    v_head_ptr = v_cache_ptr + head * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i, l_i, acc = _prefill_tiles(q, m_i, l_i, acc, q_pos, k_head_ptr, v_head_ptr, bt_row_ptr, tile_lo, mid,
                                   kv_end, qk_scale, stride_blk, stride_tok,
                                   HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    m_i, l_i, acc = _prefill_tiles(q, m_i, l_i, acc, q_pos, k_head_ptr, v_head_ptr, bt_row_ptr, mid, tile_hi,
                                   kv_end, qk_scale, stride_blk, stride_tok,
                                   HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)
    # A prefix-less row (or an empty split) stores m = -inf, l = 0, acc = 0: weight 0 in the merge.
    part = (split * num_tokens + tok) * num_heads + head
    tl.store(part_m_ptr + part, m_i, mask=row_ok)
    tl.store(part_l_ptr + part, l_i, mask=row_ok)
    tl.store(part_acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])


def query_tile_height(max_group_size: int, dtype: torch.dtype) -> int:
    """Rows per prefix-pass tile: 16 (the smallest MMA tile) up to the config's cap, so small groups do not pay
    for a 64-row tile."""
    cfg = CASCADE_CONFIG_FP32 if dtype == torch.float32 else CASCADE_CONFIG
    return min(max(16, triton.next_power_of_2(max_group_size)), cfg["block_m_max"])


def default_prefix_splits(num_tokens: int, num_groups: int, num_heads: int, block_m: int, max_prefix_len: int,
                          device: torch.device) -> int:
    """Split-K for the prefix pass: only when few, long groups leave SMs idle (e.g. 8 sequences behind 4k tokens).

    Counts the launch's upper bound of programs (``num_tokens // block_m + num_groups`` tiles per head).
    """
    if device.type != "cuda":
        return 1
    programs = (num_tokens // block_m + num_groups) * num_heads
    want = triton.cdiv(PREFIX_SPLIT_TARGET_PROGRAMS_PER_SM * _sm_count(device), max(programs, 1))
    return max(1, min(want, max_prefix_len // PREFIX_SPLIT_MIN_KEYS, SPLIT_MAX))


def bucket_splits(num_rows: int, num_heads: int, max_len: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[int, int]:
    """(prefix splits, suffix splits) of a CUDA graph's cascade step over a bucket of ``num_rows`` rows.

    A graph fixes them at capture, before any grouping is known, so they are chosen for the step the graph exists
    for: one group holding every row, behind a prefix of up to ``max_len`` tokens (the empty padding groups' programs
    return at once and are not counted). For W5 (512 rows behind 512 tokens) that is the 2 prefix splits the eager
    heuristic picks. The suffix pass splits as the ordinary decode graph of the bucket does, on ``max_len``.
    """
    block_m = query_tile_height(num_rows, dtype)
    return (default_prefix_splits(num_rows, 1, num_heads, block_m, max_len, device),
            default_num_splits(num_rows, num_heads, 1, max_len, device))


def warm_up_variants(num_heads: int, min_rows: int, max_rows: int, max_len: int, dtype: torch.dtype,
                     device: torch.device) -> list[tuple[int, int, int]]:
    """(rows, prefix splits, suffix splits) of eager cascade steps that between them compile every kernel variant
    an eager step of ``min_rows..max_rows`` rows can need: each query-tile height, each suffix split count, and
    each power-of-two ceiling of the merge's slot count. (Graph capture compiles the graphs' own variants.)"""
    if min_rows > max_rows:
        return []
    variants, heights, merges = [], set(), set()
    for rows in range(min_rows, max_rows + 1):
        h = query_tile_height(rows, dtype)
        if h not in heights:
            heights.add(h)
            variants.append((rows, 1, 1))
    merges.add(2)
    # The split heuristics grow as rows shrink and contexts grow, and go down to 1 with short contexts.
    max_prefix = default_prefix_splits(min_rows, 1, num_heads, query_tile_height(min_rows, dtype), max_len, device)
    max_suffix = default_num_splits(min_rows, num_heads, 1, max_len, device)
    for suffix in range(2, max_suffix + 1):
        variants.append((min_rows, 1, suffix))
        merges.add(triton.next_power_of_2(1 + suffix))
    for prefix in range(2, max_prefix + 1):
        for suffix in range(1, max_suffix + 1):
            if triton.next_power_of_2(prefix + suffix) not in merges:
                variants.append((min_rows, prefix, suffix))
                merges.add(triton.next_power_of_2(prefix + suffix))
    return variants


def cascade_attention(
    q: torch.Tensor,  # [B, H, D]: one decode token per sequence
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, H, D], already holding the new tokens' K/V
    query_start_loc: torch.Tensor,  # [B + 1] int32, 0..B (decode only)
    prefix_tables: torch.Tensor,  # [G, max_prefix_blocks] int32: the blocks each group shares
    prefix_lens: torch.Tensor,  # [G] int32: shared tokens of each group (0 for the group of rows sharing nothing)
    group_query_start: torch.Tensor,  # [G + 1] int32: group g owns group_rows[gqs[g]:gqs[g + 1]]
    group_rows: torch.Tensor,  # [B] int32: the rows of q, grouped; every row exactly once
    suffix_tables: torch.Tensor,  # [B, max_blocks] int32: each row's block table past its group's prefix
    suffix_lens: torch.Tensor,  # [B] int32: context length past the prefix, >= 1
    max_group_size: int,
    max_prefix_len: int,
    max_suffix_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    prefix_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention over paged contexts whose leading blocks are shared by groups of rows; returns [B, H, D].

    Equal (up to rounding) to ``paged_attention`` over the full block tables. ``num_splits`` is the suffix pass's
    split-K (default: ``default_num_splits`` over the suffixes), ``prefix_splits`` the prefix pass's
    (``default_prefix_splits``). The ``max_*`` arguments only pick the tile height and the default splits: upper
    bounds are fine (CUDA graphs pass the bucket size and the model's context length), and groups may be empty.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, pool_heads, pool_dim = kv_cache.shape
    assert (pool_heads, pool_dim) == (num_heads, head_dim), "q and the pool disagree on heads/head_dim"
    assert kv_cache.is_contiguous(), "the pool layout is [2, num_blocks, block_size, H, D], contiguous"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert group_rows.shape[0] == suffix_lens.shape[0] == num_tokens, "decode only, and every row in one group"
    assert group_query_start.shape[0] == prefix_lens.shape[0] + 1
    assert prefix_tables.stride(1) == 1 and suffix_tables.stride(1) == 1
    assert group_rows.is_contiguous() and suffix_lens.is_contiguous() and prefix_lens.is_contiguous()
    num_groups = prefix_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if q.stride(2) != 1:
        q = q.contiguous()
    if num_tokens == 0:
        return out

    fp32 = kv_cache.dtype == torch.float32
    cfg = CASCADE_CONFIG_FP32 if fp32 else CASCADE_CONFIG
    block_m = query_tile_height(max_group_size, kv_cache.dtype)
    if prefix_splits is None:
        prefix_splits = default_prefix_splits(num_tokens, num_groups, num_heads, block_m, max_prefix_len, q.device)
    if num_splits is None:
        num_splits = default_num_splits(num_tokens, num_heads, 1, max_suffix_len, q.device)
    prefix_splits, num_splits = max(1, int(prefix_splits)), max(1, int(num_splits))
    slots = prefix_splits + num_splits
    # Partials are indexed (slot, row, head) with a row count rounded up to 4, so that the suffix pass's slice
    # (which starts prefix_splits slots in) stays 16-byte aligned whatever the batch: Triton specialises pointers
    # on alignment, and an odd batch would otherwise compile another variant of the decode kernel. The kernels take
    # it as their num_tokens, which only indexes the partials.
    part_rows = triton.cdiv(num_tokens, 4) * 4
    part_m = torch.empty((slots, part_rows, num_heads), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((slots, part_rows, num_heads, head_dim), dtype=torch.float32, device=q.device)

    k_cache, v_cache = kv_cache[0], kv_cache[1]
    dot_precision = "ieee" if fp32 else "tf32"
    _cascade_prefix_kernel[(num_heads, num_tokens // block_m + num_groups, prefix_splits)](
        q, k_cache, v_cache,
        part_m, part_l, part_acc,
        prefix_tables, prefix_lens, group_query_start, group_rows,
        num_groups, part_rows, num_heads, scale * _LOG2E,
        q.stride(0), q.stride(1), prefix_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
        DOT_PRECISION=dot_precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # The suffix pass writes slots prefix_splits.. : the kernel indexes partials from the pointer it is given.
    _paged_attn_kernel[(num_heads, num_tokens, num_splits)](
        q, k_cache, v_cache, out,
        part_m[prefix_splits:], part_l[prefix_splits:], part_acc[prefix_splits:],
        suffix_tables, suffix_lens, query_start_loc,
        num_tokens, part_rows, num_heads, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), suffix_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=1, BLOCK_N=DECODE_CONFIG["block_n"],
        NUM_SPLITS=num_splits, WRITE_PARTIALS=True, DOT_PRECISION=dot_precision,
        num_warps=DECODE_CONFIG["num_warps"], num_stages=DECODE_CONFIG["num_stages"],
    )
    _merge_splits_kernel[(num_heads, num_tokens)](
        part_m, part_l, part_acc, out,
        part_rows, num_heads, slots, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLITS_POW2=triton.next_power_of_2(slots),
        num_warps=1 if head_dim <= 64 else 2,
    )
    return out
