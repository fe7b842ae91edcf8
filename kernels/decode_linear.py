"""Fused small-batch linear layer for decode: ``act(LN(x) @ W.T + bias) + residual`` in one pass over ``W``.

At decode batch sizes (M <= 16 rows) a linear layer is a matrix-vector product: every weight byte is used by at
most 16 multiply-adds, so the only cost that matters is streaming ``W`` from HBM once, and the per-kernel latency
of the elementwise ops around it. ``fused_linear`` therefore folds the GPT-2 block's LayerNorm into the matmul's
prologue and the bias, tanh-GELU and residual add into its epilogue, so a block is four kernels:
``[LN1 + c_attn + bias] -> attention -> [c_proj + bias + residual] -> [LN2 + c_fc + bias + gelu] ->
[c_proj + bias + residual]``.

Work decomposition (``W`` is ``[N, K]``, the ``F.linear`` layout, so each output row's weights are contiguous):

* Grid axis 0 tiles N by ``BLOCK_N`` weight rows; each program streams its ``[BLOCK_N, K]`` slice ``BLOCK_K``
  columns at a time with 16-byte vector loads (``evict_first``: the weights are read once, keep L2 for x).
* Grid axis 1 splits K ("split-K") when N alone gives too few programs to keep every SM's loads in flight
  (e.g. ``mlp.c_proj``: N=1600 is 25 tiles of 64 rows on 132 SMs). The K chunks are dealt out evenly
  (split s gets chunks ``[s*C//S, (s+1)*C//S)``). Each split writes its fp32 partial ``[M, BLOCK_N]`` tile to a
  workspace, then either
    - ``split_mode="serial"`` (default): bumps a per-tile arrival counter; the program that arrives last sums the
      S partials in split order (so the result does not depend on which program finished last: deterministic),
      runs the epilogue and resets the counter to 0 for the next launch / CUDA-graph replay. One kernel.
    - ``split_mode="two_pass"``: a second small kernel does that sum + epilogue. Simpler memory-ordering story,
      one more launch.
  Both give bitwise-identical results (same summation order, same epilogue code).
* The product itself has three code paths (``path``):
    - ``"batched"`` (the default for 1 < M <= 16): like ``"dot"`` below, one weight tile read once for all rows,
      but LayerNorm is folded out of the K loop (no statistics pass before it; see the comment above
      ``_batched_linear_kernel``), x / gamma / beta are fetched a chunk ahead, and the LN statistics and the
      per-split partials go to a per-split buffer, reduced in split order by the last arriving split
      ("serial") or by a second kernel with no atomics at all ("two_pass").
    - ``"dot"`` (opt-in for M > 1 since "batched"): ``tl.dot(W_tile [BLOCK_N, BLOCK_K], xT [BLOCK_K, 16])`` -- the small batch is padded to the 16
      columns the tensor cores need (the wasted MMA work is free; the kernel is memory bound). The weight tile is
      the MMA's "A" side, so the large dimension feeds the instruction's M=64 rows ("swap AB").
    - ``"fma"`` (M == 1 only): broadcast-multiply into a ``[BLOCK_N, BLOCK_K]`` fp32 register accumulator, reduced
      across K once after the loop, so the loop is pure loads + converts + FMAs with no cross-lane reduction.
      Triton only pipelines loads that feed a ``tl.dot``, so this loop prefetches the next weight chunk itself.
      Default tile 4 x 1024 with 4 warps: 8 contiguous K per thread x 32 lanes x 4 warps spans the chunk, so x's
      chunk lands directly in the layout the FMAs need (other shapes shuffle it through shared memory).
* LayerNorm prologue: every program needs each row's mean and rstd over the full K, but x is tiny (<= 16 x 6400
  halves = 200 KB, L2/L1-resident), so each program computes them itself in a first loop over x (one pass of
  shifted sums: ``sum(x - x0)`` and ``sum((x - x0)^2)`` with x0 the row's first element, which takes a large
  common offset out before squaring, so E[d^2] - E[d]^2 does not cancel), then normalises each x chunk on the fly
  in the main loop (in fp32; the "dot" path rounds the normalised chunk to the weight dtype for the tensor cores,
  as the unfused path rounds the LN output). No extra kernel, no extra launch. The price: at M=16 every program
  re-reads all of x from L2/L1 (up to 51 KB at K=1600) -- small next to its weight slice, but not nothing.

Everything is CUDA-graph capturable: no host syncs, the grid depends only on shapes, and the split-K workspace
and counters are cached per device (allocate them before capture by calling once eagerly, as any warm-up does;
if capture finds them too small the call falls back to split=1 rather than allocating). The cached workspace
is shared by all calls on a device, so calls must be ordered on one stream (they are, in the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_M = 16  # rows handled by one program column; use_fused_linear() gates the model on it
# Most split-K partials of a LoRA h that the epilogue sums (in-kernel producers, or a separate shrink's splits).
LORA_MAX_PARTS = tl.constexpr(8)

# Defaults per code path; benchmarks/decode_linear_gpu.py sweeps these and prints replacements.
# split: "auto" (see _auto_split) or a fixed number of K splits; split_mode: "serial" | "two_pass".
# w_evict: L2 eviction hint of the weight loads ("" = default policy).
DOT_CONFIG = {"path": "dot", "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4,
              "split": "auto", "split_mode": "serial", "w_evict": "evict_first"}
# fma: block_k == 8 * 32 * num_warps makes the x vector's layout the weight tile's column slice (no shared-memory
# shuffle per chunk); few rows per tile then give enough programs without split-K.
FMA_CONFIG = {"path": "fma", "block_n": 4, "block_k": 1024, "num_warps": 4, "num_stages": 1,
              "split": "auto", "split_mode": "serial", "w_evict": "evict_first", "prefetch": True}
# batched: the default for 1 < M <= 16 (see _batched_linear_kernel). Untuned starting point: a 64-row weight tile
# is the MMA's natural A operand; split-K fills the SMs.
BATCHED_CONFIG = {"path": "batched", "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4,
                  "split": "auto", "split_mode": "serial", "w_evict": "evict_first"}
_PATH_DEFAULTS = {"dot": DOT_CONFIG, "fma": FMA_CONFIG, "batched": BATCHED_CONFIG}
# Per-shape overrides, keyed (K, N, m_bucket) with m_bucket in (1, 4, 16): the smallest bucket >= M.
# Filled from the GPU sweep (the benchmark prints this dict). The sweep's old M = 4 / 16 winners were "dot"-path
# configs (the path M > 1 used before "batched"); they are gone until the batched path has its own sweep.
TUNED_CONFIGS: dict[tuple[int, int, int], dict] = {
    # Sweep winners on an H100 (benchmarks/decode_linear_gpu.py, benchmarks/results/2026-11-24_decode-linear_H100.json).
    (1600, 4800, 1): {'path': 'fma', 'block_n': 8, 'block_k': 512, 'num_warps': 2, 'num_stages': 1, 'split': 1, 'split_mode': 'serial', 'w_evict': 'evict_first', 'prefetch': False},
    (1600, 1600, 1): {'path': 'fma', 'block_n': 2, 'block_k': 1024, 'num_warps': 4, 'num_stages': 1, 'split': 1, 'split_mode': 'serial', 'w_evict': 'evict_first', 'prefetch': True},
    (1600, 6400, 1): {'path': 'fma', 'block_n': 16, 'block_k': 256, 'num_warps': 4, 'num_stages': 1, 'split': 1, 'split_mode': 'two_pass', 'w_evict': 'evict_first', 'prefetch': True},
    (6400, 1600, 1): {'path': 'fma', 'block_n': 2, 'block_k': 1024, 'num_warps': 4, 'num_stages': 1, 'split': 1, 'split_mode': 'serial', 'w_evict': 'evict_first', 'prefetch': True},
    # Small-M ("batched") winners, swept at M = 4 and M = 5 (benchmarks/results/2026-11-24_decode-linear-batched_H100.json).
    (1600, 4800, 4): {'path': 'batched', 'block_n': 32, 'block_k': 128, 'num_warps': 4, 'num_stages': 4, 'split': 1, 'split_mode': 'two_pass', 'w_evict': 'evict_first'},
    (1600, 1600, 4): {'path': 'batched', 'block_n': 64, 'block_k': 128, 'num_warps': 4, 'num_stages': 4, 'split': 4, 'split_mode': 'serial', 'w_evict': 'evict_first'},
    (1600, 6400, 4): {'path': 'batched', 'block_n': 32, 'block_k': 128, 'num_warps': 4, 'num_stages': 4, 'split': 1, 'split_mode': 'two_pass', 'w_evict': 'evict_first'},
    (6400, 1600, 4): {'path': 'batched', 'block_n': 32, 'block_k': 256, 'num_warps': 4, 'num_stages': 3, 'split': 5, 'split_mode': 'serial', 'w_evict': ''},
    (1600, 4800, 16): {'path': 'batched', 'block_n': 32, 'block_k': 128, 'num_warps': 4, 'num_stages': 4, 'split': 1, 'split_mode': 'serial', 'w_evict': 'evict_first'},
    (1600, 1600, 16): {'path': 'batched', 'block_n': 64, 'block_k': 128, 'num_warps': 4, 'num_stages': 4, 'split': 4, 'split_mode': 'serial', 'w_evict': 'evict_first'},
    (1600, 6400, 16): {'path': 'batched', 'block_n': 32, 'block_k': 128, 'num_warps': 4, 'num_stages': 4, 'split': 1, 'split_mode': 'serial', 'w_evict': ''},
    (6400, 1600, 16): {'path': 'batched', 'block_n': 32, 'block_k': 256, 'num_warps': 4, 'num_stages': 3, 'split': 5, 'split_mode': 'serial', 'w_evict': ''},
}

# The same layers at one row with an in-kernel LoRA shrink (``LoraDelta.lora_a``), where they differ: the epilogue
# waits for the producers, so fewer, longer weight programs than the plain winners do better there. Sweep winners on
# an H100 (python benchmarks/lora_gpu.py --section lora-configs, benchmarks/results/2026-11-24_lora-configs_H100.json).
TUNED_LORA_CONFIGS: dict[tuple[int, int, int], dict] = {
    (1600, 4800, 1): {**TUNED_CONFIGS[(1600, 4800, 1)], 'block_n': 16, 'block_k': 256, 'num_warps': 4, 'prefetch': True},
    (1600, 1600, 1): {**TUNED_CONFIGS[(1600, 1600, 1)], 'block_n': 8, 'block_k': 512, 'num_warps': 4, 'prefetch': True},
    (6400, 1600, 1): {**TUNED_CONFIGS[(6400, 1600, 1)], 'block_n': 4, 'block_k': 512, 'num_warps': 4, 'prefetch': True},
}

# Split-K heuristic: aim for this many programs per SM (memory-level parallelism) ...
SPLIT_TARGET_PROGRAMS_PER_SM = {"dot": 2, "fma": 4, "batched": 2}
# ... but give every split at least this many K columns (below that the partial round trip costs more) ...
SPLIT_MIN_K = 256
SPLIT_MAX = 16

@triton.jit
def _gelu_tanh(h):
    """GPT-2's gelu_new. 0.5 * (1 + tanh(u)) == sigmoid(2u), evaluated through z = exp(-2|u|) in (0, 1] so that
    nothing overflows for large |h|."""
    inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    z = tl.exp(-2.0 * tl.abs(inner))
    return h * tl.where(inner >= 0, 1.0, z) / (1.0 + z)


@triton.jit
def _row_stats(x_ptr, stride_xm, rows, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/std over the K columns of x's rows ``rows`` ([BLOCK_M] row indices, already clamped to valid
    rows), fp32. One pass of sums shifted by each row's first element: the naive E[x^2] - E[x]^2 cancels
    catastrophically when |mean| >> std, the shifted one only if the first element is itself far off."""
    row_ptr = x_ptr + rows[:, None] * stride_xm  # [BLOCK_M, 1]
    shift = tl.load(x_ptr + rows * stride_xm).to(tl.float32)  # [BLOCK_M]
    # Element-wise partial sums, reduced across lanes once after the loop (not a cross-warp reduction per chunk).
    s1 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k[None, :] < K
        t = tl.load(row_ptr + offs_k[None, :], mask=k_ok, other=0.0).to(tl.float32)
        d = tl.where(k_ok, t - shift[:, None], 0.0)
        s1 += d
        s2 += d * d
    s1 = tl.sum(s1, axis=1)
    s2 = tl.sum(s2, axis=1)
    mean_d = s1 / K
    var = tl.maximum(s2 / K - mean_d * mean_d, 0.0)
    return shift + mean_d, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _load_w_chunk(w_row_ptr, c, K, live, USE_LIVE: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  W_EVICT: tl.constexpr):
    """Weight columns [c*BLOCK_K, (c+1)*BLOCK_K) of the program's rows: [BLOCK_N, BLOCK_K]; past K reads 0.
    With USE_LIVE the scalar ``live`` predicates the whole load. The K mask is uniform over aligned groups of 16
    (K % 16 == 0 gets specialised), so the loads stay 16-byte vectors; with EVEN_K there is none at all."""
    offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
    ptr = w_row_ptr + offs_k[None, :]
    if EVEN_K and not USE_LIVE:
        w = tl.load(ptr, eviction_policy=W_EVICT)
    else:
        if USE_LIVE:
            k_end = tl.where(live, K, 0)  # a dead load masks every column (K and 0: still 16-aligned bounds)
        else:
            k_end = K
        w = tl.load(ptr, mask=(offs_k < k_end)[None, :], other=0.0, eviction_policy=W_EVICT)
    return w


@triton.jit
def _load_x_chunk(row_ptr, c, K, AXIS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """x columns of chunk c as fp32: along axis 0 ([BLOCK_K, BLOCK_M], row_ptr a [1, BLOCK_M] tensor of row
    pointers) or, with AXIS == -1, a 1-D [BLOCK_K] vector of the single row at scalar row_ptr. Past K reads
    exactly 0: those columns must add nothing to the product."""
    offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
    if AXIS == 0:
        ptr = row_ptr + offs_k[:, None]
        ok = (offs_k < K)[:, None]
    else:
        ptr = row_ptr + offs_k
        ok = offs_k < K
    if EVEN_K:
        t = tl.load(ptr, eviction_policy="evict_last")
    else:
        t = tl.load(ptr, mask=ok, other=0.0, eviction_policy="evict_last")
    return t.to(tl.float32)


@triton.jit
def _layernorm_chunk(t, mean, rstd, lnw_ptr, lnb_ptr, c, K, AXIS: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """(t - mean) * rstd * gamma + beta for one chunk laid out as by _load_x_chunk(AXIS); gamma/beta read 0 past
    K, so padded columns stay 0."""
    offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    g = tl.load(lnw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    if AXIS == 0:
        g = g[:, None]
    t = (t - mean) * (rstd * g)
    if HAS_LN_BIAS:
        b = tl.load(lnb_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        if AXIS == 0:
            b = b[:, None]
        t += b
    return t


@triton.jit
def _dot_fp32_lhs(h, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + h @ b for an fp32 ``h`` and a ``b`` of LoRA stacks' dtype. A 16-bit ``b`` gets h as hi + lo 16-bit
    parts (two MMAs on the same ``b`` tile; LoRA products are bound by their loads, not by MMA issue), recovering
    ~16-22 of h's mantissa bits where rounding it would keep 11 (fp16) or 8 (bf16). An fp32 ``b``: one MMA at
    ``DOT_PRECISION``."""
    if b.dtype == tl.float32:
        acc = tl.dot(h, b, acc, input_precision=DOT_PRECISION)
    else:
        h_hi = h.to(b.dtype)
        acc = tl.dot(h_hi, b, acc)
        acc = tl.dot((h - h_hi.to(tl.float32)).to(b.dtype), b, acc)
    return acc


@triton.jit
def _lora_shrink_tile(x_rows, a_ptr, lnw_ptr, lnb_ptr, row_ok, row_slot, s_lo, s_hi, c_lo, c_hi, K, R,
                      stride_as, stride_ar, HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """The multi-LoRA shrink of a tile of rows (``x_rows``: [BLOCK_M, 1] row pointers; ``row_slot``: each row's
    slot, one MMA chain per slot in [s_lo, s_hi) present) over K chunks [c_lo, c_hi): acc [BLOCK_M, BLOCK_R] =
    x @ A[slot].T, fp32 (kernels/lora.py's shrink and the fused linear's in-kernel producers share it).

    HAS_LN: the tile's share of LayerNorm(x) @ A.T, folded (``ln_folded_width``): with c a per-row shift, acc =
    sum_k (x_k - c) g_k A_rk, g_sum = sum_k g_k A_rk, b_sum = sum_k b_k A_rk, s1 / s2 = sum_k (x_k - c) and
    sum_k (x_k - c)^2 ([BLOCK_M]). Summed over the K ranges, those give LN(x) @ A.T with no statistics pass
    before the loop (the linearity of the batched path). c is the mean of the row's first chunk (identical for
    every K range), close to the row's mean: the centred operand rounds to 16 bits as LN's output would, and
    the fp32 variance does not cancel."""
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # element-wise; reduced once after the loops
    s2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    if HAS_LN:
        offs_k0 = tl.arange(0, BLOCK_K)
        x0 = tl.load(x_rows + offs_k0[None, :], mask=row_ok[:, None] & (offs_k0 < K)[None, :], other=0.0)
        shift = tl.sum(x0.to(tl.float32), axis=1) / tl.minimum(K, BLOCK_K)
    for s in range(s_lo, s_hi):
        sel = row_ok & (row_slot == s)
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            # A read as its transpose [BLOCK_K, BLOCK_R]: still contiguous along K in memory.
            a_cols = a_ptr + s * stride_as + offs_r[None, :] * stride_ar
            # A comes from HBM, and a kernel tuned for its weight stream may not pipeline this loop (one stage):
            # the next chunk of A and x is requested before this one is used (the request after the last chunk
            # is masked off).
            offs_k = c_lo * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < tl.where(c_lo < c_hi, K, 0)
            a_next = tl.load(a_cols + offs_k[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            x_next = tl.load(x_rows + offs_k[None, :], mask=sel[:, None] & k_ok[None, :], other=0.0)
            for c in range(c_lo, c_hi):
                offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                a = a_next
                xk = x_next
                offs_k_next = offs_k + BLOCK_K
                k_ok_next = offs_k_next < tl.where(c + 1 < c_hi, K, 0)
                a_next = tl.load(a_cols + offs_k_next[:, None], mask=k_ok_next[:, None] & r_ok[None, :], other=0.0)
                x_next = tl.load(x_rows + offs_k_next[None, :], mask=sel[:, None] & k_ok_next[None, :], other=0.0)
                if HAS_LN:
                    # Each row is loaded in its own slot's iteration only, so its sums are taken once.
                    d = tl.where(sel[:, None] & k_ok[None, :], xk.to(tl.float32) - shift[:, None], 0.0)
                    s1 += d
                    s2 += d * d
                    g = tl.load(lnw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                    af = a.to(tl.float32)
                    g_sum += tl.where(sel[:, None], tl.sum(af * g[:, None], axis=0)[None, :], 0.0)
                    if HAS_LN_BIAS:
                        b = tl.load(lnb_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                        b_sum += tl.where(sel[:, None], tl.sum(af * b[:, None], axis=0)[None, :], 0.0)
                    xk = d * g[None, :]
                acc = tl.dot(xk.to(a.dtype), a, acc, input_precision=DOT_PRECISION)
    return acc, g_sum, b_sum, tl.sum(s1, axis=1), tl.sum(s2, axis=1)


@triton.jit
def _lora_store_part(part_ptr, rows, row_ok, stride_ht, R, acc, g_sum, b_sum, s1, s2, HAS_LN: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """A shrink tile's partial into ``part_ptr`` ([rows, W] with row stride ``stride_ht``): acc in columns
    [0, R), and with HAS_LN g_sum, b_sum, s1, s2 after it (``ln_folded_width``)."""
    offs_r = tl.arange(0, BLOCK_R)
    h_ptrs = part_ptr + rows[:, None] * stride_ht + offs_r[None, :]
    h_mask = row_ok[:, None] & (offs_r < R)[None, :]
    tl.store(h_ptrs, acc, mask=h_mask)
    if HAS_LN:
        tl.store(h_ptrs + R, g_sum, mask=h_mask)
        tl.store(h_ptrs + 2 * R, b_sum, mask=h_mask)
        st_ptrs = part_ptr + rows * stride_ht + 3 * R
        tl.store(st_ptrs, s1, mask=row_ok)
        tl.store(st_ptrs + 1, s2, mask=row_ok)


@triton.jit
def _lora_produce(part, n_parts, x_ptr, stride_xm, M, K, a_ptr, R, S, lnw_ptr, lnb_ptr, slot_ptr, h_ptr, cnt_ptr,
                  HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """A fused linear's in-kernel shrink: program ``part`` of ``n_parts`` computes its K range's partial for all
    (<= 16) rows into ``h_ptr`` ([n_parts, M, W]), then counts itself done at ``cnt_ptr`` (release: the partial
    is visible to whoever sees the count)."""
    rows = tl.arange(0, 16)
    row_ok = rows < M
    row_slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    n_chunks = tl.cdiv(K, BLOCK_K)
    if HAS_LN:
        width = 3 * R + 2
    else:
        width = R
    acc, g_sum, b_sum, s1, s2 = _lora_shrink_tile(x_ptr + rows[:, None] * stride_xm, a_ptr, lnw_ptr, lnb_ptr,
                                                  row_ok, row_slot, part * 0, part * 0 + S,
                                                  part * n_chunks // n_parts, (part + 1) * n_chunks // n_parts,
                                                  K, R, R * K, K, HAS_LN, HAS_LN_BIAS, DOT_PRECISION, 16, BLOCK_R,
                                                  BLOCK_K)
    _lora_store_part(h_ptr + part * M * width, rows, row_ok, width, R, acc, g_sum, b_sum, s1, s2, HAS_LN,
                     BLOCK_R)
    tl.debug_barrier()  # every thread's stores before the one release below (as in the split-K protocol)
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _lora_b_row_tile(b_ptr, slot, offs_n, N, R, S, BLOCK_R: tl.constexpr):
    """The single row's slot's [BLOCK_N, BLOCK_R] tile of B (zeros without adapter): the "fma" path requests it
    before its weight loop, so that its HBM latency hides behind the weight stream."""
    slot = slot.to(tl.int32)
    ok = (slot >= 0) & (slot < S)
    offs_r = tl.arange(0, BLOCK_R)
    n_end = tl.where(ok, N, 0)  # no adapter: every column masked off
    return tl.load(b_ptr + tl.where(ok, slot, 0) * N * R + offs_n[:, None] * R + offs_r[None, :],
                   mask=(offs_n < n_end)[:, None] & (offs_r < R)[None, :], other=0.0)


@triton.jit
def _lora_delta(acc, offs_n, offs_m, N, M, h_ptr, b_ptr, slot_ptr, R, S, n_parts, K, ln_eps, b_pre,
                LN_FOLDED: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] (an output tile, transposed) plus each row's LoRA delta ``h[m] @ B[slot_m].T`` over
    the tile's columns, in fp32 (b_pre: see below). h: the sum of fp32 split-K partials [n_parts, M, W] (n_parts <= LORA_MAX_PARTS),
    W = R, or with LN_FOLDED a LayerNorm folded into 3R + 2 columns (``lora_h_from_parts``), unfolded here; B:
    [S, N, R] contiguous; rows whose slot is outside [0, S) get nothing."""
    m_ok = offs_m < M
    slot = tl.load(slot_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
    row_ok = m_ok & (slot >= 0) & (slot < S)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R
    if LN_FOLDED:
        width = 3 * R + 2
    else:
        width = R
    # Every partial in one request per quantity (a loop over them would wait on L2 once per partial); .cg: the
    # kernel's own producers wrote them during this launch, so read L2, never a line in L1.
    offs_p = tl.arange(0, LORA_MAX_PARTS)
    rows_p = h_ptr + offs_p[:, None] * (M * width) + offs_m[None, :] * width  # [PARTS, BLOCK_M]
    rows_ok = (offs_p < n_parts)[:, None] & row_ok[None, :]
    h_ptrs = rows_p[:, :, None] + offs_r[None, None, :]
    h_mask = rows_ok[:, :, None] & r_ok[None, None, :]
    h = tl.sum(tl.load(h_ptrs, mask=h_mask, other=0.0, cache_modifier=".cg"), axis=0)  # [BLOCK_M, BLOCK_R]
    if LN_FOLDED:
        g_sum = tl.sum(tl.load(h_ptrs + R, mask=h_mask, other=0.0, cache_modifier=".cg"), axis=0)
        b_sum = tl.sum(tl.load(h_ptrs + 2 * R, mask=h_mask, other=0.0, cache_modifier=".cg"), axis=0)
        s1 = tl.sum(tl.load(rows_p + 3 * R, mask=rows_ok, other=0.0, cache_modifier=".cg"), axis=0)
        s2 = tl.sum(tl.load(rows_p + 3 * R + 1, mask=rows_ok, other=0.0, cache_modifier=".cg"), axis=0)
        mean_d = s1 / K
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / K - mean_d * mean_d, 0.0) + ln_eps)
        h = rstd[:, None] * (h - mean_d[:, None] * g_sum) + b_sum
    if acc.shape[1] == 1:
        # One row (the "fma" path): b_pre is its slot's [BLOCK_N, BLOCK_R] tile of B (zeros without adapter),
        # requested at the start of the kernel (_lora_b_row_tile).
        acc += tl.sum(b_pre.to(tl.float32) * h, axis=1)[:, None]
    else:
        # Rows of several slots: one MMA chain per slot present, the other rows' h zeroed.
        b_t = b_ptr + offs_n[None, :] * R + offs_r[:, None]  # B[0].T tile: [BLOCK_R, BLOCK_N]
        delta = tl.zeros([acc.shape[1], acc.shape[0]], dtype=tl.float32)
        for s in range(0, S):
            sel = row_ok & (slot == s)
            if tl.max(sel.to(tl.int32), axis=0) > 0:
                b = tl.load(b_t + s * N * R, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                delta = _dot_fp32_lhs(tl.where(sel[:, None], h, 0.0), b, delta, "ieee")
        acc += tl.trans(delta)
    return acc


@triton.jit
def _epilogue(acc, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
              HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr):
    """acc: fp32 [BLOCK_N, BLOCK_M] tile of (LN(x) @ W.T)^T. Adds bias, applies GELU, adds the residual (in fp32)
    and rounds once into out."""
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if ACT_GELU:
        acc = _gelu_tanh(acc)
    mask = n_ok[:, None] & (offs_m < M)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offs_m[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_lora(acc, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                   HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr,
                   lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                   lora_cnt_ptr, n_consumers, lora_b_pre,
                   HAS_LORA: tl.constexpr, LORA_LN: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
                   LORA_NP: tl.constexpr):
    """``_epilogue`` with the LoRA delta (``_lora_delta``) added first: before the activation, where it belongs.

    LORA_NP > 0: the partials come from the kernel's own ``LORA_NP`` producer programs (``_lora_produce``), the
    lowest program ids, so they were dispatched before any program that waits here. This epilogue (one of
    ``n_consumers``) waits for their count, and the last epilogue to finish re-arms both counters for the next
    launch (or CUDA-graph replay)."""
    if HAS_LORA:
        if LORA_NP > 0:
            # A plain volatile read (an atomic would queue every N tile's poll on one L2 line); the partials
            # are read from L2 after it.
            while tl.load(lora_cnt_ptr, volatile=True) < LORA_NP:
                pass
        acc = _lora_delta(acc, offs_n, offs_m, N, M, lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S,
                          lora_parts, LORA_K, lora_eps, lora_b_pre, LORA_LN, LORA_BLOCK_R)
    _epilogue(acc, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
              HAS_BIAS, ACT_GELU, HAS_RES)
    if HAS_LORA:
        if LORA_NP > 0:
            # Relaxed: the count orders nothing but the re-arming, which every waiter has passed by then.
            if tl.atomic_add(lora_cnt_ptr + 1, 1, sem="relaxed", scope="gpu") == n_consumers - 1:
                tl.atomic_xchg(lora_cnt_ptr, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(lora_cnt_ptr + 1, 0, sem="relaxed", scope="gpu")


# M is not specialised (Triton would otherwise compile separate variants for M == 1, M % 16 == 0 and the rest):
# one binary serves every batch size, which keeps warm-up / CUDA-graph capture and the tuning sweep short.
@triton.jit(do_not_specialize=["M"])
def _fused_linear_kernel(
    x_ptr, w_ptr, bias_ptr, lnw_ptr, lnb_ptr, res_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, ln_eps,
    stride_xm, stride_wn, stride_rm, stride_om,
    HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr,
    SPLIT_MODE: tl.constexpr,  # 0: no split-K; 1: serial (last arriver reduces); 2: partials only (two-pass)
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    W_EVICT: tl.constexpr,  # L2 policy of the weight stream ("evict_first": read once, keep x and the rest)
    PREFETCH: tl.constexpr,  # "fma" path: request the next weight chunk before computing on this one
    lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
    lora_a_ptr, lora_cnt_ptr,
    HAS_LORA: tl.constexpr, LORA_LN: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
    LORA_NP: tl.constexpr,  # > 0: that many programs of axis 0 (the first) are the LoRA shrink's producers
    LORA_BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0) - LORA_NP
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n_consumers = tl.num_programs(0) - LORA_NP  # the epilogues: one per N tile
    if LORA_NP > 0:
        if pid_n < 0:  # a LoRA shrink producer (those of split row 0; the other rows' have nothing to do)
            if pid_s == 0:
                _lora_produce(pid_n + LORA_NP, LORA_NP, x_ptr, stride_xm, M, K, lora_a_ptr, LORA_R, LORA_S,
                              lnw_ptr, lnb_ptr, lora_slot_ptr, lora_h_ptr, lora_cnt_ptr, LORA_LN, HAS_LN_BIAS,
                              DOT_PRECISION, LORA_BLOCK_R, LORA_BLOCK_K)
            return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    # Clamp instead of masking: rows past N re-read row N-1 and padded batch rows re-read row M-1, so the weight
    # and x loads of the main loop need no predicate (with EVEN_K, none at all). Those lanes are never stored.
    rows_w = tl.minimum(offs_n, N - 1).to(tl.int64)
    rows_x = tl.minimum(offs_m, M - 1)
    w_row_ptr = w_ptr + rows_w[:, None] * stride_wn  # [BLOCK_N, 1]
    lora_b_pre = pid_n  # only the one-row ("fma") epilogue reads it
    if HAS_LORA:
        if not USE_DOT:
            lora_slot = tl.load(lora_slot_ptr)  # requested now, used once the B tile is requested below

    if HAS_LN:
        mean, rstd = _row_stats(x_ptr, stride_xm, rows_x, K, ln_eps, BLOCK_M, BLOCK_K)

    # This split's share of the K chunks, dealt out evenly.
    n_chunks = tl.cdiv(K, BLOCK_K)
    c_lo = pid_s * n_chunks // n_splits
    c_hi = (pid_s + 1) * n_chunks // n_splits

    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for c in range(c_lo, c_hi):
            w = _load_w_chunk(w_row_ptr, c, K, 0, False, BLOCK_K, EVEN_K, W_EVICT)
            # x chunk, transposed to [BLOCK_K, BLOCK_M] (the MMA's "B"), normalised in fp32, then rounded to the
            # weight dtype for the tensor cores.
            xt = _load_x_chunk(x_ptr + rows_x[None, :] * stride_xm, c, K, 0, BLOCK_K, EVEN_K)
            if HAS_LN:
                xt = _layernorm_chunk(xt, mean[None, :], rstd[None, :], lnw_ptr, lnb_ptr, c, K, 0,
                                      HAS_LN_BIAS, BLOCK_K)
            acc += tl.dot(w, xt.to(w.dtype), input_precision=DOT_PRECISION)
    else:
        # BLOCK_M == 1. Triton's pipeliner only stages loads that feed a tl.dot, so with PREFETCH the loop
        # software-pipelines itself: chunk c+1's weights are requested before chunk c's FMAs are issued (the
        # request past this split's last chunk is predicated off, costing no traffic).
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if HAS_LN:  # [1] -> scalars
            mean_1 = tl.sum(mean, axis=0)
            rstd_1 = tl.sum(rstd, axis=0)
        if PREFETCH:
            w_next = _load_w_chunk(w_row_ptr, c_lo, K, c_lo < c_hi, True, BLOCK_K, EVEN_K, W_EVICT)
        if HAS_LORA:
            lora_b_pre = _lora_b_row_tile(lora_b_ptr, lora_slot, offs_n, N, LORA_R, LORA_S, LORA_BLOCK_R)
        for c in range(c_lo, c_hi):
            if PREFETCH:
                w = w_next
                w_next = _load_w_chunk(w_row_ptr, c + 1, K, c + 1 < c_hi, True, BLOCK_K, EVEN_K, W_EVICT)
            else:
                w = _load_w_chunk(w_row_ptr, c, K, 0, False, BLOCK_K, EVEN_K, W_EVICT)
            # The single row as a 1-D vector: broadcasting it against the weight tile lets the compiler load
            # it straight into the layout the FMAs need (a 2-D [1, BLOCK_K] load was shuffled through shared
            # memory every iteration).
            xr = _load_x_chunk(x_ptr, c, K, -1, BLOCK_K, EVEN_K)
            if HAS_LN:
                xr = _layernorm_chunk(xr, mean_1, rstd_1, lnw_ptr, lnb_ptr, c, K, -1, HAS_LN_BIAS, BLOCK_K)
            acc2 += w.to(tl.float32) * xr[None, :]
        acc = tl.sum(acc2, axis=1)[:, None]  # the one cross-lane reduction: [BLOCK_N, 1]

    if SPLIT_MODE == 0:
        _epilogue_lora(acc, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                       HAS_BIAS, ACT_GELU, HAS_RES,
                       lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                       lora_cnt_ptr, n_consumers, lora_b_pre, HAS_LORA, LORA_LN, LORA_BLOCK_R, LORA_NP)
    else:
        # Partial tile -> workspace [S, M, N] (fp32).
        ws_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        ws_tile = offs_m[None, :] * N + offs_n[:, None]
        tl.store(ws_ptr + pid_s * M * N + ws_tile, acc, mask=ws_mask)
        if SPLIT_MODE == 1:
            # Make every thread's partial stores happen-before the release below (the scalar atomic is issued by
            # one thread; the barrier + a gpu-scope release make the whole CTA's stores visible, as in CUTLASS's
            # split-K semaphore).
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == n_splits - 1:
                # Last split of this N tile: every other partial is visible (acquire above). Sum in split order,
                # not arrival order, so the result is deterministic. .cg: read L2, never a stale L1 line.
                total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for s in range(0, n_splits):
                    total += tl.load(ws_ptr + s * M * N + ws_tile, mask=ws_mask, other=0.0, cache_modifier=".cg")
                _epilogue_lora(total, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                               HAS_BIAS, ACT_GELU, HAS_RES,
                               lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                               lora_cnt_ptr, n_consumers, lora_b_pre, HAS_LORA, LORA_LN, LORA_BLOCK_R, LORA_NP)
                # Re-arm the counter for the next launch (and the next CUDA-graph replay). Nobody else touches it
                # before this kernel ends: all n_splits programs of this tile have arrived.
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, res_ptr, out_ptr, M, N, n_splits, stride_rm, stride_om,
                          HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                          lora_a_ptr, lora_cnt_ptr,
                          HAS_LORA: tl.constexpr, LORA_LN: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
                          LORA_NP: tl.constexpr, LORA_BLOCK_K: tl.constexpr):
    """split_mode="two_pass": sum the S partials in split order (same order as the serial path) + epilogue."""
    n_consumers = tl.num_programs(0)  # unused: LoRA producers (LORA_NP > 0) run with serial split-K only
    lora_b_pre = n_consumers  # read by the one-row epilogue only
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tile = offs_m[None, :] * N + offs_n[:, None]
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for s in range(0, n_splits):
        total += tl.load(ws_ptr + s * M * N + tile, mask=mask, other=0.0)
    _epilogue_lora(total, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                   HAS_BIAS, ACT_GELU, HAS_RES,
                   lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                   lora_cnt_ptr, n_consumers, lora_b_pre, HAS_LORA, LORA_LN, LORA_BLOCK_R, LORA_NP)


# ----------------------------------------------------------------------------------------------------------------
# "batched" path (1 < M <= 16): one weight tile, read once, serves every row, and the LayerNorm is folded out of
# the K loop.
#
# Why a second tile kernel: the "dot" path above scales badly with rows (H100, CUDA graphs: c_attn 10 us at M=1,
# 23 us at M=4; c_fc 13 -> 26 us), and the slowdown is all in its LayerNorm layers (the others stay near cuBLAS).
# Every one of its programs first runs a full pass over x for the row statistics -- a chain of dependent L2 loads
# that Triton does not pipeline, during which that program streams no weights -- and then normalises each x
# chunk with the mean/rstd in hand. This path needs no statistics before the loop, by linearity:
#
#   LN(x)_k = (x_k - mu) * r * g_k + b_k,   so   y_n = r * (sum_k W_nk g_k (x_k - s) - (mu - s) * sum_k W_nk g_k)
#                                                    + sum_k W_nk b_k
#
# for any per-row shift s. The MMA's B operand carries g_k * (x_k - s) in columns 0..M-1, g_k in column M and b_k
# in column M+1 (columns the padding to 16 leaves free; M > 14 pads to 32 instead), so one tl.dot per chunk yields
# the three sums, while the same loop accumulates sum(x - s) and sum((x - s)^2) from the x chunk it already holds.
# mu and r are applied once, in the epilogue. Under split-K each split sums its own K range and writes its partial
# tile plus its two statistics; the reduction adds them in split order (deterministic) before that epilogue.
#
# s is the mean of the row's first chunk (the same value in every program, so splits combine), close to mu: the
# operand g_k * (x_k - s) then has the magnitude of the centred input, and its rounding to fp16/bf16 costs what
# rounding LN's output costs in the unfused path (s = x_0 alone would be poor when x_0 is an outlier feature).
# Statistics accumulate in fp32 around that shift, so E[d^2] - E[d]^2 does not cancel.


@triton.jit
def _load_k_vec(ptr, c, K, BLOCK_K: tl.constexpr):
    """Chunk c of a [K] vector (LN gamma / beta) as fp32; 0 past K, so padded columns contribute nothing."""
    offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
    return tl.load(ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)


@triton.jit
def _ln_unfold(acc, s1, s2, cols, M, K, eps):
    """acc [BLOCK_N, BLOCK_M]: columns < M hold sum_k W g (x - s), column M sum_k W g, column M+1 sum_k W b;
    s1 / s2 [BLOCK_M]: sum (x - s), sum (x - s)^2 over all K. Returns LN(x) @ W.T for columns < M (fp32)."""
    gw = tl.sum(tl.where(cols[None, :] == M, acc, 0.0), axis=1)
    bw = tl.sum(tl.where(cols[None, :] == M + 1, acc, 0.0), axis=1)
    mean_d = s1 / K  # mu - s
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / K - mean_d * mean_d, 0.0) + eps)
    return rstd[None, :] * (acc - mean_d[None, :] * gw[:, None]) + bw[:, None]


@triton.jit
def _sum_partials(ws_ptr, st_ptr, tile, n_tiles, n_splits, offs_n, cols, MC, N,
                  HAS_LN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum the splits' partial tiles (and LN statistics) of N tile ``tile``, in split order."""
    mask = (offs_n < N)[:, None] & (cols < MC)[None, :]
    ptrs = ws_ptr + cols[None, :] * N + offs_n[:, None]
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(0, n_splits):
        # .cg: read L2, never an L1 line cached before another program wrote the partial.
        total += tl.load(ptrs + s * MC * N, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_LN:
            st = st_ptr + ((s * n_tiles + tile) * 2) * BLOCK_M + cols
            s1 += tl.load(st, cache_modifier=".cg")
            s2 += tl.load(st + BLOCK_M, cache_modifier=".cg")
    return total, s1, s2


@triton.jit(do_not_specialize=["M"])
def _batched_linear_kernel(
    x_ptr, w_ptr, bias_ptr, lnw_ptr, lnb_ptr, res_ptr, out_ptr, ws_ptr, st_ptr, cnt_ptr,
    M, N, K, ln_eps,
    stride_xm, stride_wn, stride_rm, stride_om,
    HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr,
    SPLIT_MODE: tl.constexpr,  # 0: no split-K; 1: serial (last arriver reduces); 2: partials only (two-pass)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    W_EVICT: tl.constexpr,
    lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
    lora_a_ptr, lora_cnt_ptr,
    HAS_LORA: tl.constexpr, LORA_LN: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
    LORA_NP: tl.constexpr,  # > 0: that many programs of axis 0 (the first) are the LoRA shrink's producers
    LORA_BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0) - LORA_NP
    pid_s = tl.program_id(1)
    n_tiles = tl.num_programs(0) - LORA_NP
    n_splits = tl.num_programs(1)
    n_consumers = n_tiles
    lora_b_pre = n_tiles  # several rows: the epilogue loads B per slot present
    if LORA_NP > 0:
        if pid_n < 0:  # a LoRA shrink producer (as in _fused_linear_kernel)
            if pid_s == 0:
                _lora_produce(pid_n + LORA_NP, LORA_NP, x_ptr, stride_xm, M, K, lora_a_ptr, LORA_R, LORA_S,
                              lnw_ptr, lnb_ptr, lora_slot_ptr, lora_h_ptr, lora_cnt_ptr, LORA_LN, HAS_LN_BIAS,
                              DOT_PRECISION, LORA_BLOCK_R, LORA_BLOCK_K)
            return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    # Clamped, as in the dot path: the main loop's weight and x loads need no row predicate.
    rows_w = tl.minimum(offs_n, N - 1).to(tl.int64)
    w_row_ptr = w_ptr + rows_w[:, None] * stride_wn  # [BLOCK_N, 1]
    x_col_ptr = x_ptr + tl.minimum(cols, M - 1)[None, :] * stride_xm  # [1, BLOCK_M]: x^T's columns

    n_chunks = tl.cdiv(K, BLOCK_K)
    c_lo = pid_s * n_chunks // n_splits
    c_hi = (pid_s + 1) * n_chunks // n_splits

    if HAS_LN:
        # The shift: mean of each row's first chunk (one L2 read, identical in every program).
        x0 = _load_x_chunk(x_col_ptr, 0, K, 0, BLOCK_K, EVEN_K)
        shift = tl.sum(x0, axis=0) / tl.minimum(K, BLOCK_K)  # [BLOCK_M]
        s1 = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)  # element-wise; reduced once after the loop
        s2 = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
        is_x = cols[None, :] < M
        is_g = cols[None, :] == M

    # Triton's pipeliner stages the weight loads (they feed tl.dot directly) but not x / gamma / beta, whose
    # values pass through arithmetic first; so those are requested one chunk ahead by hand. The request after
    # the last chunk re-reads the last chunk (clamped: an in-bounds L2 hit, no predicate needed).
    xt_next = _load_x_chunk(x_col_ptr, c_lo, K, 0, BLOCK_K, EVEN_K)
    if HAS_LN:
        g_next = _load_k_vec(lnw_ptr, c_lo, K, BLOCK_K)
        if HAS_LN_BIAS:
            b_next = _load_k_vec(lnb_ptr, c_lo, K, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for c in range(c_lo, c_hi):
        c_next = tl.minimum(c + 1, n_chunks - 1)
        xt = xt_next
        xt_next = _load_x_chunk(x_col_ptr, c_next, K, 0, BLOCK_K, EVEN_K)
        w = _load_w_chunk(w_row_ptr, c, K, 0, False, BLOCK_K, EVEN_K, W_EVICT)
        if HAS_LN:
            g = g_next
            g_next = _load_k_vec(lnw_ptr, c_next, K, BLOCK_K)
            d = xt - shift[None, :]
            if not EVEN_K:  # x past K reads 0, which is not 0 after the shift
                d = tl.where((c * BLOCK_K + tl.arange(0, BLOCK_K) < K)[:, None], d, 0.0)
            s1 += d
            s2 += d * d
            if HAS_LN_BIAS:
                b = b_next
                b_next = _load_k_vec(lnb_ptr, c_next, K, BLOCK_K)
                extra = tl.where(is_g, g[:, None], b[:, None])
            else:
                extra = tl.where(is_g, g[:, None], 0.0)
            bt = tl.where(is_x, d * g[:, None], extra)
        else:
            bt = xt
        acc += tl.dot(w, bt.to(w.dtype), input_precision=DOT_PRECISION)

    if HAS_LN:
        s1r = tl.sum(s1, axis=0)
        s2r = tl.sum(s2, axis=0)
    else:
        s1r = tl.zeros([BLOCK_M], dtype=tl.float32)
        s2r = s1r
    if SPLIT_MODE == 0:
        if HAS_LN:
            acc = _ln_unfold(acc, s1r, s2r, cols, M, K, ln_eps)
        _epilogue_lora(acc, offs_n, cols, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                       HAS_BIAS, ACT_GELU, HAS_RES,
                       lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                       lora_cnt_ptr, n_consumers, lora_b_pre, HAS_LORA, LORA_LN, LORA_BLOCK_R, LORA_NP)
    else:
        # Partial tile -> workspace [S, MC, N] (MC = M, plus the two LN sums' columns), statistics -> [S, tiles,
        # 2, BLOCK_M] (one slot per program: no two programs write the same address).
        MC = M + 2 if HAS_LN else M
        ws_mask = (offs_n < N)[:, None] & (cols < MC)[None, :]
        tl.store(ws_ptr + pid_s * MC * N + cols[None, :] * N + offs_n[:, None], acc, mask=ws_mask)
        if HAS_LN:
            st = st_ptr + ((pid_s * n_tiles + pid_n) * 2) * BLOCK_M + cols
            tl.store(st, s1r)
            tl.store(st + BLOCK_M, s2r)
        if SPLIT_MODE == 1:
            # Same protocol as _fused_linear_kernel: barrier + gpu-scope acq_rel counter; the last arriver sums
            # in split order, finishes and re-arms the counter.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == n_splits - 1:
                total, t1, t2 = _sum_partials(ws_ptr, st_ptr, pid_n, n_tiles, n_splits, offs_n, cols, MC, N,
                                              HAS_LN, BLOCK_M, BLOCK_N)
                if HAS_LN:
                    total = _ln_unfold(total, t1, t2, cols, M, K, ln_eps)
                _epilogue_lora(total, offs_n, cols, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                               HAS_BIAS, ACT_GELU, HAS_RES,
                               lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                               lora_cnt_ptr, n_consumers, lora_b_pre, HAS_LORA, LORA_LN, LORA_BLOCK_R, LORA_NP)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _batched_reduce_kernel(ws_ptr, st_ptr, bias_ptr, res_ptr, out_ptr, M, N, K, ln_eps, n_splits,
                           stride_rm, stride_om,
                           HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, ACT_GELU: tl.constexpr,
                           HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                           lora_a_ptr, lora_cnt_ptr,
                           HAS_LORA: tl.constexpr, LORA_LN: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
                           LORA_NP: tl.constexpr, LORA_BLOCK_K: tl.constexpr):
    """split_mode="two_pass" of the batched path: no atomics at all. Same tiles as the main kernel (the
    statistics slots are per tile), same summation order and epilogue as the serial mode: identical bits."""
    pid_n = tl.program_id(0)
    n_consumers = tl.num_programs(0)  # unused: LoRA producers (LORA_NP > 0) run with serial split-K only
    lora_b_pre = n_consumers  # read by the one-row epilogue only
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    MC = M + 2 if HAS_LN else M
    total, s1, s2 = _sum_partials(ws_ptr, st_ptr, pid_n, tl.num_programs(0), n_splits, offs_n, cols, MC, N,
                                  HAS_LN, BLOCK_M, BLOCK_N)
    if HAS_LN:
        total = _ln_unfold(total, s1, s2, cols, M, K, ln_eps)
    _epilogue_lora(total, offs_n, cols, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                   HAS_BIAS, ACT_GELU, HAS_RES,
                   lora_h_ptr, lora_b_ptr, lora_slot_ptr, LORA_R, LORA_S, lora_parts, LORA_K, lora_eps,
                   lora_cnt_ptr, n_consumers, lora_b_pre, HAS_LORA, LORA_LN, LORA_BLOCK_R, LORA_NP)


# ----------------------------------------------------------------------------------------------------------------
# Host side


# Rows up to which the model routes a linear layer through ``fused_linear``. Measured on an H100 inside CUDA
# graphs (benchmarks/results/2026-11-24_decode-linear_H100.json): GPT-2 XL's 48 layers of linears take 1.83 ms
# fused against 2.58 ms unfused at 1 row, but 3.40 against 2.60 at 4 rows and 3.77 against 2.62 at 16 -- with
# the "dot" path, before the "batched" path existed. The batched path (LayerNorm folded out of the K loop) then
# measured 2.35 against 2.64 ms at 5 rows and 2.39 against 2.62 at 10 (untuned; the tuned per-layer configs above
# add ~10 %), but 2.86 against 2.61 at 16 (benchmarks/results/2026-11-24_decode-linear-batched_H100.txt): the
# model uses it up to 10 rows, which covers a speculative verify step (k + 1 = 5 rows a request) at batch 1 and 2.
MODEL_MAX_ROWS = 10


def use_fused_linear(m: int, device) -> bool:
    """Whether the model should route a linear layer with ``m`` rows through ``fused_linear``."""
    return torch.device(device).type == "cuda" and 0 < m <= MODEL_MAX_ROWS


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: only matters for the split heuristic
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# Split-K scratch, per device: fp32 partials and int32 arrival counters (zero between launches: the last
# arriver of each tile resets its counter). Sized generously on first use so that steady-state calls, and CUDA
# graph captures after a warm-up call, never allocate.
_WS_MIN_ELEMS = 1 << 21  # 8 MiB of fp32: S * M * N for every GPT-2 XL layer at M=16 with S <= 16
_CNT_MIN_ELEMS = 1 << 14
_WORKSPACE: dict[tuple[str, int | None], torch.Tensor] = {}
_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _scratch(device: torch.device, ws_elems: int, cnt_elems: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached workspace and counters, grown if needed; None if they are too small during graph capture."""
    # "cuda" and "cuda:0" must share one entry: a reservation made for the one is found by calls on the other.
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (device.type, index)
    ws, cnt = _WORKSPACE.get(key), _COUNTERS.get(key)
    if ws is None or ws.numel() < ws_elems or cnt is None or cnt.numel() < cnt_elems:
        if _capturing(device):
            return None
        if ws is None or ws.numel() < ws_elems:
            ws = torch.empty(max(ws_elems, _WS_MIN_ELEMS), dtype=torch.float32, device=device)
            _WORKSPACE[key] = ws
        if cnt is None or cnt.numel() < cnt_elems:
            cnt = torch.zeros(max(cnt_elems, _CNT_MIN_ELEMS), dtype=torch.int32, device=device)
            _COUNTERS[key] = cnt
    return ws, cnt


def reserve_scratch(device) -> None:
    """Allocate the device's split-K workspace and counters now. Call before capturing CUDA graphs: a capture
    that finds them missing cannot allocate, so its linears run unsplit (and LoRA deltas without in-kernel
    producers), and the engine's eager steps never reach ``fused_linear`` to allocate them."""
    _scratch(torch.device(device), _WS_MIN_ELEMS, _CNT_MIN_ELEMS)


def _m_bucket(m: int) -> int:
    return 1 if m <= 1 else 4 if m <= 4 else 16


def _auto_split(tiles: int, k: int, block_k: int, path: str, device: torch.device) -> int:
    target = SPLIT_TARGET_PROGRAMS_PER_SM[path] * _sm_count(device)
    want = max(1, round(target / tiles))
    return max(1, min(want, k // SPLIT_MIN_K, triton.cdiv(k, block_k), SPLIT_MAX))


def resolve_config(m: int, n: int, k: int, device, config: dict | None = None, lora_producers: bool = False) -> dict:
    """The launch configuration ``fused_linear`` uses for an [m, k] x [n, k]^T product (``config`` entries
    override the defaults / tuned table), with ``split`` resolved to a number. ``lora_producers``: the launch has
    in-kernel LoRA producers (``TUNED_LORA_CONFIGS`` first)."""
    device = torch.device(device)
    config = dict(config or {})
    key = (k, n, _m_bucket(m))
    tuned = (TUNED_LORA_CONFIGS.get(key) if lora_producers else None) or TUNED_CONFIGS.get(key)
    if "path" in config or tuned is None:  # an explicit path starts from that path's defaults, not the table
        path = config.get("path") or ("fma" if m == 1 else "batched")
        base = _PATH_DEFAULTS[path]
    else:
        base = tuned
    cfg = {**base, **config}
    if cfg["path"] == "fma" and m != 1:  # the register-accumulator path handles one row only
        cfg = {**BATCHED_CONFIG, **{key: v for key, v in config.items() if key != "path"}, "path": "batched"}
    if cfg["path"] in ("dot", "batched"):  # tl.dot needs every tile dimension >= 16
        cfg["block_n"] = max(16, cfg["block_n"])
        cfg["block_k"] = max(16, cfg["block_k"])
    tiles = triton.cdiv(n, cfg["block_n"])
    split = cfg["split"]
    split = _auto_split(tiles, k, cfg["block_k"], cfg["path"], device) if split == "auto" else int(split)
    cfg["split"] = max(1, min(split, triton.cdiv(k, cfg["block_k"])))  # every split gets >= 1 chunk
    return cfg


def ln_folded_width(rank: int) -> int:
    """Columns of a LayerNorm-folded LoRA shrink partial (``kernels.lora.lora_shrink_partials`` with a norm)."""
    return 3 * rank + 2


def lora_h_from_parts(h_parts: torch.Tensor, rank: int, k: int, ln_eps: float) -> torch.Tensor:
    """h = LayerNorm(x) @ A.T ``[T, R]`` from the LN-folded shrink partials ``[P, T, 3R + 2]`` (K = ``k``): with c
    the shift, the columns sum to P = sum (x - c) g A, G = sum g A, B = sum b A, s1 = sum (x - c), s2 = sum
    (x - c)^2, and LN(x) @ A.T = rstd * (P - (mu - c) * G) + B. (The fused epilogue does the same in fp32.)"""
    total = h_parts.sum(0)
    p, g, b = total[:, :rank], total[:, rank:2 * rank], total[:, 2 * rank:3 * rank]
    mean_d = total[:, 3 * rank] / k
    rstd = torch.rsqrt((total[:, 3 * rank + 1] / k - mean_d * mean_d).clamp_min(0.0) + ln_eps)
    return rstd[:, None] * (p - mean_d[:, None] * g) + b


# In-kernel LoRA shrink (``LoraDelta.lora_a``): producer programs, each over an equal share of K's chunks of
# LORA_SHRINK_BLOCK_K. They run beside the weight stream, so a few with several chunks each finish long before
# the epilogues wait on them, and the epilogues sum few partials.
LORA_PRODUCERS_MAX = 8
LORA_PRODUCER_MIN_K = 256
LORA_SHRINK_BLOCK_K = 64


@dataclass(frozen=True)
class LoraDelta:
    """A multi-LoRA delta for ``fused_linear``'s epilogue, added before the activation: row m gets
    ``h[m] @ lora_b[slot_ids[m]].T``; rows whose slot is outside ``[0, S)`` get nothing. ``lora_b``: ``[S, N, R]``
    contiguous, ``slot_ids``: int ``[M]``. h is one of:

    * ``lora_a`` (``[S, R, K]`` contiguous): computed inside the kernel from the same x (and LayerNorm) as the
      product, by producer programs that run beside the weight stream (``_lora_produce``): the delta costs no
      launch of its own and its shrink is off the critical path;
    * ``h_parts``: given, the sum of fp32 split-K partials ``[P, M, R]`` (``kernels.lora.lora_shrink_partials``;
      rows without adapter are never read), or with ``ln_eps`` set, LayerNorm-folded partials
      ``[P, M, 3R + 2]`` of the layer's raw x (``lora_h_from_parts``)."""

    lora_b: torch.Tensor
    slot_ids: torch.Tensor
    lora_a: torch.Tensor | None = None
    h_parts: torch.Tensor | None = None
    ln_eps: float | None = None


def lora_producers(k: int) -> int:
    return max(1, min(LORA_PRODUCERS_MAX, LORA_MAX_PARTS.value, k // LORA_PRODUCER_MIN_K))


def _lora_args(lora: LoraDelta | None, m: int, n: int, k: int, ln_eps: float | None, dummy: torch.Tensor) -> dict:
    """The LoRA epilogue's kernel arguments (pointers of a disabled part are never dereferenced); ``ln_eps``: the
    product's LayerNorm, if it has one (in-kernel producers fold the same one into h)."""
    args = dict(lora_h_ptr=dummy, lora_b_ptr=dummy, lora_slot_ptr=dummy, LORA_R=0, LORA_S=0, lora_parts=0,
                LORA_K=k, lora_eps=0.0, lora_a_ptr=dummy, lora_cnt_ptr=dummy, HAS_LORA=False, LORA_LN=False,
                LORA_BLOCK_R=16, LORA_NP=0, LORA_BLOCK_K=LORA_SHRINK_BLOCK_K)
    if lora is None:
        return args
    s, nb, r = lora.lora_b.shape
    assert nb == n and lora.lora_b.is_contiguous(), f"lora_b must be a contiguous [S, {n}, R]"
    assert lora.slot_ids.shape == (m,) and lora.slot_ids.is_contiguous()
    assert (lora.lora_a is None) != (lora.h_parts is None), "LoraDelta: give lora_a or h_parts"
    args.update(lora_b_ptr=lora.lora_b, lora_slot_ptr=lora.slot_ids, LORA_R=r, LORA_S=s, HAS_LORA=True,
                LORA_BLOCK_R=max(16, triton.next_power_of_2(r)))
    if lora.lora_a is not None:
        assert lora.lora_a.shape == (s, r, k) and lora.lora_a.is_contiguous(), f"lora_a must be a contiguous [S, R, {k}]"
        producers = lora_producers(k)
        width = ln_folded_width(r) if ln_eps is not None else r
        h_parts = torch.empty(producers, m, width, dtype=torch.float32, device=dummy.device)
        args.update(lora_h_ptr=h_parts, lora_parts=producers, lora_eps=float(ln_eps or 0.0), lora_a_ptr=lora.lora_a,
                    LORA_LN=ln_eps is not None, LORA_NP=producers)
        return args
    assert lora.h_parts.shape[0] <= LORA_MAX_PARTS.value, f"at most {LORA_MAX_PARTS.value} partials"
    folded = lora.ln_eps is not None
    width = ln_folded_width(r) if folded else r
    assert lora.h_parts.shape[1:] == (m, width) and lora.h_parts.is_contiguous(), (
        f"h_parts is {tuple(lora.h_parts.shape)}, expected [P, {m}, {width}]")
    assert lora.h_parts.dtype == torch.float32
    args.update(lora_h_ptr=lora.h_parts, lora_parts=lora.h_parts.shape[0], lora_eps=float(lora.ln_eps or 0.0),
                LORA_LN=folded)
    return args


def _lora_counters(args: dict, device: torch.device) -> bool:
    """Point in-kernel producers at their two counters (the last two of the cached split-K counters, which no N
    tile reaches); False if graph capture finds none cached (the caller then computes h beforehand)."""
    scratch = _scratch(device, 0, 2)
    if scratch is None:
        return False
    args["lora_cnt_ptr"] = scratch[1][-2:]
    return True


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(1) == 1 else t.contiguous()


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    lora: LoraDelta | None = None,
) -> torch.Tensor:
    """``act(LayerNorm(x) @ weight.T + bias [+ lora delta]) + residual`` for a small batch, one pass over ``weight``.

    x: [..., K] with at most ``MAX_M`` rows in all; weight: [N, K] (``F.linear`` layout, rows contiguous);
    bias: [N]; ln_weight / ln_bias: [K] (LayerNorm applied when ``ln_weight`` is given; statistics in fp32);
    activation: None or "gelu_tanh"; residual: [..., N], added last (``out`` may be ``residual`` itself, for an
    in-place residual update). fp32 accumulation, result in ``x.dtype`` (or ``out``'s dtype), shaped [..., N].
    ``config`` overrides launch parameters (see ``DOT_CONFIG``), for tests and tuning. ``lora``: a multi-LoRA
    delta the epilogue adds before the activation (``LoraDelta``), so that an adapter keeps the layer one kernel.
    """
    if activation not in (None, "gelu_tanh", "gelu_new"):
        raise ValueError(f"unsupported activation {activation!r}")
    if ln_bias is not None and ln_weight is None:
        raise ValueError("ln_bias without ln_weight")
    k = x.shape[-1]
    n, kw = weight.shape
    assert kw == k, f"x has {k} features, weight expects {kw}"
    assert weight.stride(1) == 1, "weight rows must be contiguous ([out_features, in_features])"
    x2 = _rows(x, k)
    m = x2.shape[0]
    assert m <= MAX_M, f"fused_linear handles at most {MAX_M} rows, got {m} (see use_fused_linear)"
    out_shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    assert out.shape == out_shape, f"out is {tuple(out.shape)}, expected {out_shape}"
    out2 = out.view(m, n)  # must be a view: the kernel writes into it
    assert out2.stride(1) == 1
    if residual is not None:
        assert residual.shape == out_shape, f"residual is {tuple(residual.shape)}, expected {out_shape}"
        res2 = _rows(residual, n)
    if m == 0:
        return out
    for t, name, size in ((bias, "bias", n), (ln_weight, "ln_weight", k), (ln_bias, "ln_bias", k)):
        assert t is None or (t.shape == (size,) and t.is_contiguous()), f"{name} must be contiguous [{size}]"

    cfg = resolve_config(m, n, k, x.device, config, lora_producers=lora is not None and lora.lora_a is not None)
    lora_args = _lora_args(lora, m, n, k, ln_eps if ln_weight is not None else None, out2)
    if lora_args["LORA_NP"]:
        if not _lora_counters(lora_args, x.device):
            from gpt2serve.kernels.lora import lora_shrink_partials

            h_parts = lora_shrink_partials(x2, lora.lora_a, lora.slot_ids, ln_weight=ln_weight, ln_bias=ln_bias)
            lora = LoraDelta(lora.lora_b, lora.slot_ids, h_parts=h_parts,
                             ln_eps=ln_eps if ln_weight is not None else None)
            lora_args = _lora_args(lora, m, n, k, None, out2)
        elif cfg["split"] > 1:  # the two-pass reduce kernel does not wait for the producers
            cfg["split_mode"] = "serial"
    if cfg["path"] == "batched":
        _launch_batched(x2, weight, bias, ln_weight, ln_bias, ln_eps, activation, res2 if residual is not None
                        else None, out2, cfg, lora_args)
        return out
    use_dot = cfg["path"] == "dot"
    block_m = 16 if use_dot else 1  # the dot path pads the batch to the MMA's minimum of 16 columns
    block_n, block_k, split = cfg["block_n"], cfg["block_k"], cfg["split"]
    tiles = triton.cdiv(n, block_n)

    ws = cnt = None
    split_mode = 0
    if split > 1:
        scratch = _scratch(x.device, split * m * n, tiles)
        if scratch is None:  # graph capture found the cache too small: correct, just not split
            split = 1
        else:
            ws, cnt = scratch
            split_mode = 1 if cfg["split_mode"] == "serial" else 2
    dummy = out2  # any tensor: pointers of disabled features are never dereferenced
    _fused_linear_kernel[(tiles + lora_args["LORA_NP"], split)](
        x2, weight,
        bias if bias is not None else dummy,
        ln_weight if ln_weight is not None else dummy,
        ln_bias if ln_bias is not None else dummy,
        res2 if residual is not None else dummy,
        out2,
        ws if ws is not None else dummy,
        cnt if cnt is not None else dummy,
        m, n, k, float(ln_eps),
        x2.stride(0), weight.stride(0),
        res2.stride(0) if residual is not None else 0, out2.stride(0),
        HAS_BIAS=bias is not None, HAS_LN=ln_weight is not None, HAS_LN_BIAS=ln_bias is not None,
        ACT_GELU=activation is not None, HAS_RES=residual is not None,
        SPLIT_MODE=split_mode, USE_DOT=use_dot,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, W_EVICT=cfg["w_evict"],
        PREFETCH=bool(cfg.get("prefetch", True)), **lora_args,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split_mode == 2:
        rb = 128
        _splitk_reduce_kernel[(triton.cdiv(n, rb),)](
            ws, bias if bias is not None else dummy, res2 if residual is not None else dummy, out2,
            m, n, split, res2.stride(0) if residual is not None else 0, out2.stride(0),
            HAS_BIAS=bias is not None, ACT_GELU=activation is not None, HAS_RES=residual is not None,
            BLOCK_M=16, BLOCK_N=rb, **lora_args, num_warps=4,
        )
    return out


def _launch_batched(x2, weight, bias, ln_weight, ln_bias, ln_eps, activation, res2, out2, cfg, lora_args) -> None:
    """The "batched" path's launch(es): the main kernel, plus the reduce kernel in two-pass split-K mode."""
    m, k = x2.shape
    n = weight.shape[0]
    has_ln = ln_weight is not None
    mc = m + 2 if has_ln else m  # columns of the MMA's B operand in use (x rows, then gamma and beta sums)
    block_m = 16 if mc <= 16 else 32
    block_n, block_k, split = cfg["block_n"], cfg["block_k"], cfg["split"]
    tiles = triton.cdiv(n, block_n)
    ws = st = cnt = None
    split_mode = 0
    if split > 1:
        # Partials [S, mc, N], then the LN statistics [S, tiles, 2, block_m].
        st_elems = split * tiles * 2 * block_m if has_ln else 0
        scratch = _scratch(x2.device, split * mc * n + st_elems, tiles)
        if scratch is None:  # graph capture found the cache too small: correct, just not split
            split = 1
        else:
            ws_all, cnt = scratch
            ws = ws_all[: split * mc * n]
            st = ws_all[split * mc * n:]
            split_mode = 1 if cfg["split_mode"] == "serial" else 2
    dummy = out2  # pointers of disabled features are never dereferenced
    common = dict(HAS_BIAS=bias is not None, HAS_LN=has_ln, ACT_GELU=activation is not None,
                  HAS_RES=res2 is not None, BLOCK_M=block_m, BLOCK_N=block_n, **lora_args)
    res_stride = res2.stride(0) if res2 is not None else 0
    _batched_linear_kernel[(tiles + lora_args["LORA_NP"], split)](
        x2, weight,
        bias if bias is not None else dummy,
        ln_weight if has_ln else dummy,
        ln_bias if ln_bias is not None else dummy,
        res2 if res2 is not None else dummy,
        out2,
        ws if ws is not None else dummy,
        st if st is not None and st.numel() else dummy,
        cnt if cnt is not None else dummy,
        m, n, k, float(ln_eps),
        x2.stride(0), weight.stride(0), res_stride, out2.stride(0),
        HAS_LN_BIAS=ln_bias is not None, SPLIT_MODE=split_mode,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, W_EVICT=cfg["w_evict"], **common,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split_mode == 2:
        _batched_reduce_kernel[(tiles,)](
            ws, st if st.numel() else dummy, bias if bias is not None else dummy,
            res2 if res2 is not None else dummy, out2,
            m, n, k, float(ln_eps), split, res_stride, out2.stride(0), **common, num_warps=4,
        )


def fused_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    lora: LoraDelta | None = None,
) -> torch.Tensor:
    """PyTorch reference of ``fused_linear``: everything in fp32, rounded once to x.dtype (or out's dtype)."""
    del config
    if activation not in (None, "gelu_tanh", "gelu_new"):
        raise ValueError(f"unsupported activation {activation!r}")
    h = x.float()
    if ln_weight is not None:
        h = torch.nn.functional.layer_norm(h, (x.shape[-1],), ln_weight.float(),
                                           None if ln_bias is None else ln_bias.float(), ln_eps)
    y = torch.nn.functional.linear(h, weight.float(), None if bias is None else bias.float())
    if lora is not None:
        s, _, r = lora.lora_b.shape
        ids = lora.slot_ids.long()
        has = (ids >= 0) & (ids < s)
        lora_h = lora.h_parts.sum(0) if lora.ln_eps is None else lora_h_from_parts(lora.h_parts, r, x.shape[-1],
                                                                                     lora.ln_eps)
        delta = torch.einsum("mr,mnr->mn", lora_h, lora.lora_b[ids.clamp(0, s - 1)].float())
        y = y + torch.where(has[:, None], delta, 0.0).view(y.shape)
    if activation is not None:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual.float()
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out
