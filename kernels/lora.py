"""Multi-LoRA for a flat batch of token rows: ``y[t] += (x[t] @ A[s].T) @ B[s].T`` with ``s = slot_ids[t]``.

Every row of a step may belong to a different adapter. The engine keeps up to ``S`` adapters resident as stacks
per linear layer (the layouts this module expects; the loader produces them):

* ``lora_a``: ``[S, R, K]`` -- A matrices, rank zero-padded up to the stack's R (padding adds exact zeros),
* ``lora_b``: ``[S, N, R]`` -- B matrices with ``lora_alpha / r`` already folded in,
* ``slot_ids``: int32 ``[T]`` (int64 accepted), each row's slot; ``-1`` (or anything outside ``[0, S)``) means
  no adapter: such rows of ``y`` are never written, so they stay bit-identical.

Two kernels, ``shrink`` (``h = x @ A[s].T``, ``[T, R]``) then ``expand`` (``y += h @ B[s].T``). ``h`` stays fp32
between them: it is only T x R, and rounding it to 16 bits would add a second rounding to every delta. Both are
``tl.dot`` kernels over tiles of ``BLOCK_M`` rows, and there are two ways of forming those tiles (``path``):

* ``"sorted"``: ``lora_segments`` groups the rows by slot once per step (one single-program kernel: a stable
  counting sort, giving ``order`` and per-slot ``starts``). Each tile then holds rows of one slot only, so one
  MMA chain per tile, and each slot's A / B tile is read once per ``BLOCK_M`` of its rows. Programs are laid
  out over ``cdiv(T, BLOCK_M) + min(S, T)`` tile slots (each non-empty slot adds at most one partial tile) and
  each finds its (slot, rows) from ``starts`` with a scalar loop over the slots -- no host bookkeeping, no
  device->host sync; surplus programs find no rows and do nothing. The segments depend only on ``slot_ids``, so
  the engine should compute them once per step and pass them to every layer's ``apply_lora`` (otherwise each
  call adds the grouping launch).
* ``"masked"``: no grouping: tiles are consecutive rows, and each tile runs one MMA chain per slot present in it
  (rows of other slots masked to zero). Costs a chain per distinct slot per tile, so it suits batches of at most
  one tile: then every present slot's A / B is read exactly once, and no grouping launch is needed at all.
``path="auto"`` takes "masked" for ``T <= MASKED_MAX_ROWS`` and "sorted" above. Both are CUDA-graph capturable:
grids and allocations depend on shapes only (T, S, R, K, N), the grouping runs on the device, and there are no
``.item()`` / host syncs on the launch path, so whichever path ``auto`` picks for the captured T is the one
replayed (T is fixed per graph; slot_ids / x / y may change in place between replays).

Shrink split-K: at decode sizes there are only a handful of row tiles, and each would stream its slot's whole
``R x K`` A on one SM. So grid axis 1 cuts K into ``split`` ranges; each writes its own fp32 partial
``[split, T, R]`` (no atomics: deterministic), and expand sums the partials as it loads ``h`` (``split * BLOCK_M
* R`` floats per program, from L2).

Expand on 16-bit B: the tensor cores take 16-bit operands, so fp32 ``h`` goes in as ``hi + lo`` 16-bit parts
(two MMAs on the same B tile; the kernel is bound by its y / B traffic, not by MMA issue), recovering ~16-22
mantissa bits instead of rounding h to 11 (fp16) or 8 (bf16). fp32 stacks use the "ieee" (non-TF32) dot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpt2serve.kernels.decode_linear import (_dot_fp32_lhs, _lora_shrink_tile, _lora_store_part, _sm_count,
                                             ln_folded_width, lora_h_from_parts)

NO_ADAPTER = -1

# Rows up to which path="auto" skips the grouping: one masked tile holds them all (decode batches).
MASKED_MAX_ROWS = 16
# Untuned defaults (benchmarks/lora_gpu.py times them at GPT-2 XL shapes). "auto" block_m: 16 rows at decode
# sizes (fewer wasted MMA rows per slot), 64 for prefill-sized T (fewer re-reads of each slot's A / B).
SHRINK_CONFIG = {"block_m": "auto", "block_k": 64, "split": "auto", "num_warps": 4, "num_stages": 2}
EXPAND_CONFIG = {"block_m": "auto", "block_n": 64, "num_warps": 4, "num_stages": 2}
BLOCK_M_SMALL_T = 256  # T up to which "auto" block_m is 16
# Shrink split-K heuristic: about this many programs per SM, but every split gets >= SPLIT_MIN_K columns
# (below that the extra partial costs more than it saves) and at most SPLIT_MAX partials (expand re-reads them).
SPLIT_TARGET_PROGRAMS_PER_SM = 2
SPLIT_MIN_K = 256
SPLIT_MAX = 8
SPLIT_MAX_LARGE_T = 2  # for T > BLOCK_M_SMALL_T
# The grouping kernel's chunk of rows. Fixed, so one binary serves every T (fewer compiles at graph capture).
# 512 rows x 16 buckets (S <= 14) of int32 is 32 registers a thread at 8 warps (cumsum needs a few such tiles).
_SEGMENT_BLOCK_T = 512


# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit(do_not_specialize=["T"])
def _segments_kernel(slot_ptr, order_ptr, starts_ptr, T, S,
                     BLOCK_T: tl.constexpr, S_PAD: tl.constexpr):
    """Stable counting sort of the rows by slot, in one program. Bucket S collects the rows without adapter,
    so ``starts`` has S + 2 entries: ``order[starts[s]:starts[s + 1]]`` are slot s's rows, in row order.
    Two passes over slot_ids (counts, then scatter); within a chunk a row's rank in its bucket is a cumsum down
    the one-hot [rows, buckets] matrix."""
    buckets = tl.arange(0, S_PAD)
    counts = tl.zeros([S_PAD], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        key = tl.load(slot_ptr + t, mask=ok, other=-1).to(tl.int32)
        key = tl.where((key < 0) | (key >= S), S, key)
        hit = ((key[:, None] == buckets[None, :]) & ok[:, None]).to(tl.int32)
        counts += tl.sum(hit, axis=0)
    base = tl.cumsum(counts, axis=0) - counts  # exclusive prefix; entry S + 1 is T (its bucket is empty)
    tl.store(starts_ptr + buckets, base, mask=buckets < S + 2)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        key = tl.load(slot_ptr + t, mask=ok, other=-1).to(tl.int32)
        key = tl.where((key < 0) | (key >= S), S, key)
        hit = ((key[:, None] == buckets[None, :]) & ok[:, None]).to(tl.int32)
        rank = tl.cumsum(hit, axis=0)  # 1-based position within the chunk's rows of the same bucket
        dest = tl.sum(tl.where(hit != 0, base[None, :] + rank - 1, 0), axis=1)
        tl.store(order_ptr + dest, t, mask=ok)
        base += tl.sum(hit, axis=0)


@triton.jit
def _segment_tile(pid, starts_ptr, S, BLOCK_M: tl.constexpr):
    """(slot, lo, hi) of tile slot ``pid`` in the sorted order: slots' tiles are numbered consecutively, slot s
    having cdiv(count_s, BLOCK_M) of them. Beyond the last tile: slot -1 and an empty range. S is small (<= a
    few dozen), so a scalar loop beats a search."""
    slot = pid * 0 - 1
    lo = pid * 0
    hi = pid * 0
    seen = pid * 0
    for s in range(0, S):
        c0 = tl.load(starts_ptr + s)
        c1 = tl.load(starts_ptr + s + 1)
        n = (c1 - c0 + BLOCK_M - 1) // BLOCK_M
        hit = (pid >= seen) & (pid < seen + n)
        lo = tl.where(hit, c0 + (pid - seen) * BLOCK_M, lo)
        hi = tl.where(hit, c1, hi)
        slot = tl.where(hit, s, slot)
        seen += n
    return slot, lo, hi


@triton.jit
def _tile_rows(pid, slot_ptr, order_ptr, starts_ptr, T, S, SORTED: tl.constexpr, BLOCK_M: tl.constexpr):
    """A program's rows (int64 indices into x / y), which are real, their slots, and the range of slots to run
    an MMA chain for."""
    if SORTED:
        slot, lo, hi = _segment_tile(pid, starts_ptr, S, BLOCK_M)
        idx = lo + tl.arange(0, BLOCK_M)
        row_ok = idx < hi
        rows = tl.load(order_ptr + idx, mask=row_ok, other=0)
        s_lo = slot
        s_hi = tl.where(slot >= 0, slot + 1, slot)  # surplus tile: no iteration
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        # Tensors, not the constants: S == 1 arrives as a constexpr, and the callers loop over [s_lo, s_hi).
        s_lo = pid * 0
        s_hi = pid * 0 + S
    row_slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    return rows.to(tl.int64), row_ok, row_slot, s_lo, s_hi


@triton.jit(do_not_specialize=["T"])
def _shrink_kernel(x_ptr, a_ptr, h_ptr, slot_ptr, order_ptr, starts_ptr, lnw_ptr, lnb_ptr,
                   T, K, R, S,
                   stride_xt, stride_as, stride_ar, stride_hp, stride_ht,
                   SORTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_part[split, rows, :R] = x[rows, K range of this split] @ A[slot, :R, same range].T, fp32 (with HAS_LN
    the LayerNorm-folded columns of ``decode_linear._lora_shrink_tile``). Rows of no adapter inside a masked tile
    get zeros; rows outside every tile are not written."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows, row_ok, row_slot, s_lo, s_hi = _tile_rows(pid_m, slot_ptr, order_ptr, starts_ptr, T, S, SORTED,
                                                    BLOCK_M)
    n_chunks = tl.cdiv(K, BLOCK_K)
    c_lo = pid_k * n_chunks // n_split
    c_hi = (pid_k + 1) * n_chunks // n_split
    acc, g_sum, b_sum, s1, s2 = _lora_shrink_tile(x_ptr + rows[:, None] * stride_xt, a_ptr, lnw_ptr, lnb_ptr,
                                                  row_ok, row_slot, s_lo, s_hi, c_lo, c_hi, K, R,
                                                  stride_as, stride_ar, HAS_LN, HAS_LN_BIAS, DOT_PRECISION,
                                                  BLOCK_M, BLOCK_R, BLOCK_K)
    _lora_store_part(h_ptr + pid_k * stride_hp, rows, row_ok, stride_ht, R, acc, g_sum, b_sum, s1, s2,
                     HAS_LN, BLOCK_R)


@triton.jit(do_not_specialize=["T"])
def _expand_kernel(h_ptr, b_ptr, y_ptr, slot_ptr, order_ptr, starts_ptr,
                   T, N, R, S, n_parts,
                   stride_hp, stride_bs, stride_bn, stride_yt,
                   SORTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[rows, cols] += (sum_p h_part[p, rows]) @ B[slot, cols, :R].T for the rows with an adapter; y_ptr already
    points at the first column of this call's slice. One rounding per element of y."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, row_ok, row_slot, s_lo, s_hi = _tile_rows(pid_m, slot_ptr, order_ptr, starts_ptr, T, S, SORTED,
                                                    BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(s_lo, s_hi):
        sel = row_ok & (row_slot == s)
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            h_mask = sel[:, None] & r_ok[None, :]
            h_ptrs = h_ptr + rows[:, None] * R + offs_r[None, :]
            h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for p in range(0, n_parts):
                h += tl.load(h_ptrs + p * stride_hp, mask=h_mask, other=0.0)
            b = tl.load(b_ptr + s * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None],
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # B[s].T tile: [BLOCK_R, BLOCK_N]
            acc = _dot_fp32_lhs(h, b, acc, DOT_PRECISION)
    has_adapter = row_ok & (row_slot >= 0) & (row_slot < S)
    mask = has_adapter[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Host side


@dataclass(frozen=True)
class LoraSegments:
    """Rows grouped by slot (``lora_segments``): ``order[starts[s]:starts[s + 1]]`` are the rows of slot s in row
    order; ``order[starts[num_slots]:]`` the rows without adapter. Device tensors, int32."""

    slot_ids: torch.Tensor  # [T], the tensor the segments were computed from
    order: torch.Tensor  # [T]
    starts: torch.Tensor  # [num_slots + 2]
    num_slots: int


def lora_segments(slot_ids: torch.Tensor, num_slots: int) -> LoraSegments:
    """Group a step's rows by slot: one single-program kernel, no host sync (CUDA-graph capturable). Depends only
    on ``slot_ids``: compute it once per step and hand it to every ``apply_lora`` of the step."""
    assert slot_ids.dim() == 1 and slot_ids.dtype in (torch.int32, torch.int64), "slot_ids: int32 [T]"
    assert slot_ids.is_contiguous()
    t = slot_ids.shape[0]
    order = torch.empty(t, dtype=torch.int32, device=slot_ids.device)
    starts = torch.empty(num_slots + 2, dtype=torch.int32, device=slot_ids.device)
    if t == 0:
        starts.zero_()
        return LoraSegments(slot_ids, order, starts, num_slots)
    _segments_kernel[(1,)](slot_ids, order, starts, t, num_slots,
                           BLOCK_T=_SEGMENT_BLOCK_T, S_PAD=triton.next_power_of_2(num_slots + 2), num_warps=8)
    return LoraSegments(slot_ids, order, starts, num_slots)


def resolve_config(t: int, k: int, n: int, r: int, num_slots: int, device, config: dict | None = None) -> dict:
    """The launch parameters ``apply_lora`` uses for T rows, K -> N at rank R (``config`` overrides: ``path``,
    ``shrink`` / ``expand`` dicts like ``SHRINK_CONFIG`` / ``EXPAND_CONFIG``), every "auto" resolved."""
    del n  # not used by the heuristics yet; part of the signature for per-shape tuning
    config = dict(config or {})
    path = config.get("path", "auto")
    if path == "auto":
        path = "masked" if t <= MASKED_MAX_ROWS else "sorted"
    assert path in ("masked", "sorted"), f"unknown path {path!r}"
    shrink = {**SHRINK_CONFIG, **config.get("shrink", {})}
    expand = {**EXPAND_CONFIG, **config.get("expand", {})}
    auto_m = 16 if t <= BLOCK_M_SMALL_T else 64
    for c in (shrink, expand):
        c["block_m"] = max(16, auto_m if c["block_m"] == "auto" else int(c["block_m"]))  # tl.dot: >= 16
    shrink["block_k"] = max(16, int(shrink["block_k"]))
    expand["block_n"] = max(16, int(expand["block_n"]))
    block_r = max(16, triton.next_power_of_2(r))
    chunks = triton.cdiv(k, shrink["block_k"])
    if shrink["split"] == "auto":
        tiles = triton.cdiv(t, shrink["block_m"]) + (min(num_slots, t) - 1 if path == "sorted" else 0)
        want = triton.cdiv(SPLIT_TARGET_PROGRAMS_PER_SM * _sm_count(torch.device(device)), max(1, tiles))
        # Above decode sizes every expand program re-reading split partials of h costs about as much as its y
        # tile, while the shrink already has tiles enough to be near bandwidth: cap it there.
        split = min(want, k // SPLIT_MIN_K, SPLIT_MAX if t <= BLOCK_M_SMALL_T else SPLIT_MAX_LARGE_T)
    else:
        split = int(shrink["split"])
    shrink["split"] = max(1, min(split, chunks))  # every split gets >= 1 chunk
    return {"path": path, "block_r": block_r, "shrink": shrink, "expand": expand}


def _check_stacks(lora_a: torch.Tensor | None, lora_b: torch.Tensor | None):
    if lora_a is not None:
        assert lora_a.dim() == 3 and lora_a.stride(2) == 1, "lora_a: [S, R, K], K contiguous"
    if lora_b is not None:
        assert lora_b.dim() == 3 and lora_b.stride(2) == 1, "lora_b: [S, N, R], R contiguous"


def _segments_for(path: str, slot_ids: torch.Tensor, num_slots: int, segments: LoraSegments | None):
    if path == "masked":
        return None
    if segments is None:
        return lora_segments(slot_ids, num_slots)
    assert segments.num_slots == num_slots and segments.order.shape == slot_ids.shape, "stale segments"
    return segments


def _launch_shrink(x, lora_a, slot_ids, segs, h_parts, cfg, ln_weight=None, ln_bias=None):
    t, k = x.shape
    s, r, _ = lora_a.shape
    c = cfg["shrink"]
    bm = c["block_m"]
    sorted_ = segs is not None
    tiles = triton.cdiv(t, bm) + (min(s, t) if sorted_ else 0)
    order, starts = (segs.order, segs.starts) if sorted_ else (slot_ids, slot_ids)  # unused when masked
    for v, name in ((ln_weight, "ln_weight"), (ln_bias, "ln_bias")):
        assert v is None or (v.shape == (k,) and v.is_contiguous()), f"{name} must be a contiguous [{k}]"
    assert ln_bias is None or ln_weight is not None, "ln_bias without ln_weight"
    _shrink_kernel[(tiles, c["split"])](
        x, lora_a, h_parts, slot_ids, order, starts,
        ln_weight if ln_weight is not None else x, ln_bias if ln_bias is not None else x,  # x: never read
        t, k, r, s,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), h_parts.stride(0), h_parts.stride(1),
        SORTED=sorted_, DOT_PRECISION="ieee" if lora_a.dtype == torch.float32 else "tf32",
        HAS_LN=ln_weight is not None, HAS_LN_BIAS=ln_bias is not None,
        BLOCK_M=bm, BLOCK_R=cfg["block_r"], BLOCK_K=c["block_k"],
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )


def _launch_expand(h_parts, lora_b, slot_ids, segs, y_cols, cfg):
    t = slot_ids.shape[0]
    s, n, r = lora_b.shape
    c = cfg["expand"]
    bm = c["block_m"]
    sorted_ = segs is not None
    tiles = triton.cdiv(t, bm) + (min(s, t) if sorted_ else 0)
    order, starts = (segs.order, segs.starts) if sorted_ else (slot_ids, slot_ids)
    _expand_kernel[(tiles, triton.cdiv(n, c["block_n"]))](
        h_parts, lora_b, y_cols, slot_ids, order, starts,
        t, n, r, s, h_parts.shape[0],
        h_parts.stride(0), lora_b.stride(0), lora_b.stride(1), y_cols.stride(0),
        SORTED=sorted_, DOT_PRECISION="ieee" if lora_b.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=c["block_n"], BLOCK_R=cfg["block_r"],
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )


def _y_slice(y: torch.Tensor, t: int, n: int, column_offset: int) -> torch.Tensor:
    assert y.dim() == 2 and y.shape[0] == t and y.stride(1) == 1, "y: [T, N_total], columns contiguous"
    assert 0 <= column_offset and column_offset + n <= y.shape[1], (
        f"columns [{column_offset}, {column_offset + n}) outside y's {y.shape[1]}")
    return y[:, column_offset:column_offset + n]


def lora_shrink_partials(x: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor, *,
                         ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None,
                         segments: LoraSegments | None = None, config: dict | None = None,
                         zero_fill: bool = False) -> torch.Tensor:
    """The shrink alone, for a consumer that sums the split-K partials itself (``decode_linear.LoraDelta``):
    fp32 ``h_parts [split, T, W]``. Without ``ln_weight``: W = R and the sum over the first axis is
    ``x[t] @ lora_a[slot_ids[t]].T``. With it: the shrink of ``LayerNorm(x)`` (gamma ``ln_weight``, beta
    ``ln_bias``), folded: W = 3R + 2 columns (``_shrink_kernel``) that ``decode_linear.lora_h_from_parts`` (or the
    fused linear's epilogue) turns into h given the norm's eps. x [T, K] (K contiguous), lora_a [S, R, K]. Rows
    without adapter are zero with ``zero_fill``, unspecified otherwise. One launch (plus the grouping on the
    sorted path without ``segments``)."""
    _check_stacks(lora_a, None)
    t, k = x.shape
    s, r, ka = lora_a.shape
    assert ka == k and x.stride(1) == 1 and slot_ids.shape == (t,) and slot_ids.is_contiguous()
    cfg = resolve_config(t, k, 0, r, s, x.device, config)
    alloc = torch.zeros if zero_fill else torch.empty
    width = ln_folded_width(r) if ln_weight is not None else r
    h_parts = alloc(cfg["shrink"]["split"], t, width, dtype=torch.float32, device=x.device)
    if t and s:
        _launch_shrink(x, lora_a, slot_ids, _segments_for(cfg["path"], slot_ids, s, segments), h_parts, cfg,
                       ln_weight, ln_bias)
    return h_parts


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor, *,
                ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None, ln_eps: float = 1e-5,
                segments: LoraSegments | None = None, config: dict | None = None) -> torch.Tensor:
    """``h[t] = x'[t] @ lora_a[slot_ids[t]].T`` with x' = x, or ``LayerNorm(x)`` (fp32 statistics) when
    ``ln_weight`` is given: x [T, K] (fp16 / bf16 / fp32, K contiguous), lora_a [S, R, K] -> h [T, R] **fp32**,
    zero rows for rows without adapter. (``apply_lora`` keeps the split-K partials unsummed and leaves those rows
    unwritten; this standalone form sums and zero-fills, for tests and other callers.)"""
    h_parts = lora_shrink_partials(x, lora_a, slot_ids, ln_weight=ln_weight, ln_bias=ln_bias, segments=segments,
                                   config=config, zero_fill=True)
    if ln_weight is not None:
        s = lora_a.shape[0]
        has = (slot_ids >= 0) & (slot_ids < s)
        h = lora_h_from_parts(h_parts, lora_a.shape[1], x.shape[1], ln_eps)
        return torch.where(has[:, None], h, 0.0)  # padding rows' statistics are zeros: their h is not
    return h_parts[0] if h_parts.shape[0] == 1 else h_parts.sum(0)


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, slot_ids: torch.Tensor, y: torch.Tensor, *,
                column_offset: int = 0, segments: LoraSegments | None = None, config: dict | None = None) -> None:
    """``y[t, column_offset:column_offset + N] += h[t] @ lora_b[slot_ids[t]].T`` in place: h [T, R] (any float
    dtype; fp32 expected), lora_b [S, N, R], y [T, >= column_offset + N] (columns contiguous). Rows without
    adapter are not touched. The column offset lets a fused output (GPT-2's c_attn: q | k | v) take one call per
    slice; a B stacked over the whole fused width needs none."""
    _check_stacks(None, lora_b)
    t, r = h.shape
    s, n, rb = lora_b.shape
    assert rb == r and slot_ids.shape == (t,)
    y_cols = _y_slice(y, t, n, column_offset)
    if t == 0:
        return
    cfg = resolve_config(t, 0, n, r, s, y.device, config)
    h_parts = h.float().contiguous().unsqueeze(0)
    _launch_expand(h_parts, lora_b, slot_ids, _segments_for(cfg["path"], slot_ids, s, segments), y_cols, cfg)


def apply_lora(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               slot_ids: torch.Tensor, *, column_offset: int = 0, segments: LoraSegments | None = None,
               config: dict | None = None) -> torch.Tensor:
    """The layer's one call: ``y[t, off:off + N] += (x[t] @ A[s].T) @ B[s].T`` for every row t with an adapter
    (``s = slot_ids[t]`` in ``[0, S)``), in place; returns y. x [T, K], y [T, >= off + N] (the base linear's
    output), lora_a [S, R, K], lora_b [S, N, R], slot_ids int32 [T] (x / y may also carry the same leading
    dims, flattened to T rows). x is rounded to the stacks' dtype for the MMA if the two differ. ``segments``:
    this step's ``lora_segments(slot_ids, S)``, used by the "sorted" path (computed here if not given). Two kernel
    launches (plus the grouping one without ``segments`` on the sorted path); capturable in a CUDA graph."""
    _check_stacks(lora_a, lora_b)
    if x.dim() != 2:  # leading dims: flatten both sides; y must stay a view so the kernel writes into it
        x = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        apply_lora(x, y2, lora_a, lora_b, slot_ids.reshape(-1), column_offset=column_offset,
                   segments=segments, config=config)
        return y
    t, k = x.shape
    s, r, ka = lora_a.shape
    sb, n, rb = lora_b.shape
    assert ka == k and sb == s and rb == r, (
        f"shapes: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    assert x.stride(1) == 1 and slot_ids.shape == (t,) and slot_ids.is_contiguous()
    y_cols = _y_slice(y, t, n, column_offset)
    if t == 0 or s == 0:
        return y
    cfg = resolve_config(t, k, n, r, s, x.device, config)
    segs = _segments_for(cfg["path"], slot_ids, s, segments)
    # Rows outside every sorted tile (no adapter) stay unwritten: expand never reads them.
    h_parts = torch.empty(cfg["shrink"]["split"], t, r, dtype=torch.float32, device=x.device)
    _launch_shrink(x, lora_a, slot_ids, segs, h_parts, cfg)
    _launch_expand(h_parts, lora_b, slot_ids, segs, y_cols, cfg)
    return y


def lora_delta_ref(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   slot_ids: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: the delta ``[T, N]`` in fp32 (zero rows without adapter), one slot at a time."""
    t = x.shape[0]
    s, n = lora_b.shape[0], lora_b.shape[1]
    out = torch.zeros(t, n, dtype=torch.float32, device=x.device)
    for slot in range(s):
        rows = (slot_ids == slot).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = (x[rows].float() @ lora_a[slot].float().T) @ lora_b[slot].float().T
    return out
