"""Weight-only quantized linear layers: ``act(x @ dequant(W).T + bias) + residual`` with int8 or int4 weights.

Why: a decode step multiplies a handful of activation rows by every weight matrix of the model, so its cost is
streaming the weights from HBM once (GPT-2 XL: 3.1 GB in fp16, ~1 ms at 3 TB/s). Storing them as int8 halves the
bytes, int4 quarters them; the kernels below dequantize in registers, so HBM only ever sees the packed form.

Layouts (the engine's layer code depends on exactly these; ``W`` is ``[N, K]``, the ``F.linear`` layout):

* int8, symmetric per output channel: ``qweight`` int8 ``[N, K]``, ``scales`` ``[N]`` (activation dtype);
  ``W[n, k] = qweight[n, k] * scales[n]``.
* int4, asymmetric per group of ``group_size`` input features (``G = ceil(K / group_size)`` groups; the last one
  may be partial, e.g. GPT-2 XL's K = 1600 with groups of 128): ``qweight`` int32 ``[N, K // 8]``, nibble j
  (bits 4j..4j+3) of word w holds the unsigned value for k = 8w + j; ``scales`` and ``zeros`` ``[N, G]`` in the
  activation dtype (float zero points, so that integer GPTQ/AWQ zeros are exact);
  ``W[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]``.
  Optional ``perm`` ([K] ints, GPTQ act-order after the loader sorted the input features by group): the product
  is ``x[:, perm] @ W.T``. Decode gathers x's columns through ``perm`` inside the kernel (x is a few KB; the
  weights stay contiguous); prefill gathers x once with ``index_select`` first, so that its tiles stay
  contiguous for the asynchronous copies.

Work decomposition. One Triton kernel serves both regimes; the host picks tiles by M:

* The product is computed transposed ("swap AB"): each program owns an ``[BLOCK_N, BLOCK_M]`` tile of out^T and
  accumulates ``tl.dot(W_tile [BLOCK_N, BLOCK_K], x^T [BLOCK_K, BLOCK_M])`` in fp32. The dequantized weight tile
  is the MMA's A operand, the one Hopper's wgmma can take from registers (B, here x^T, is staged in shared
  memory by asynchronous copies), and the weight dimension, the large one, feeds the instruction's 64-row side.
* Decode (M <= 16): BLOCK_M = 16 (the batch is padded to the tensor cores' minimum; the wasted MMA work is free,
  the kernel is memory bound). Chosen over an FMA loop for M == 1 because at int4 the weights arrive at ~6e12
  values/s (3 TB/s x 2 per byte) and the CUDA cores have ~3.4e13 fp32 ops/s: every per-weight instruction
  counts. With tl.dot a weight costs an unpack (shift, and) and a convert, and the tensor cores do the multiply;
  an FMA loop would add a subtract, a multiply and the FMA itself. For the same reason int4 decode "folds" the
  group's zero point and scale out of the inner product: with one group per K chunk (``group_size`` a multiple
  of BLOCK_K),
      sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k),
  so the chunk's dot runs on the raw 0..15 values (exact in fp16 / bf16) and the scale and zero are applied to
  the [BLOCK_N, BLOCK_M] partial product, BLOCK_K times fewer operations than per weight (and no rounding of
  dequantized weights at all). int8 per channel is simpler still: the scale is applied once per output after
  the K loop. Grid: N tiles x K splits. GPT-2 XL's mlp.c_proj (N = 1600) is only 25 tiles of 64 rows on 132 SMs,
  so K is split until there are ~2 programs per SM; each split writes an fp32 partial tile to a workspace, and
  the last split to arrive at a tile (an arrival counter, ``split_mode="serial"``) or a second small kernel
  (``"two_pass"``) sums the partials in split order -- deterministic -- and runs the epilogue. The serial mode
  saves a launch, which matters when an int4 layer streams 1.3 MB in well under 2 us.
* Prefill (M > 16): the same tiles grow along M (32 / 64 / 128 rows), and the weight tile is dequantized per
  element to the activation dtype before the dot (int8: converted, the per-channel scale still applied after
  the loop; int4: unpacked, zero subtracted and scale multiplied in fp32, rounded once). At these sizes
  dequantizing BLOCK_N x BLOCK_K weights per chunk is cheaper than folding into the BLOCK_N x BLOCK_M partial,
  and the dot accumulates in place. Consecutive program ids share a weight tile (M tiles vary fastest), so each
  weight tile is read from HBM about once while x stays in L2. Split-K is used here too when the tiles alone
  leave SMs idle (e.g. M = 64).
* Epilogue, fused in the same kernel: + bias, tanh-GELU (``decode_linear._gelu_tanh``), + residual, all in fp32,
  rounded once to the output dtype. So a model's linear sub-layer is one kernel.
* Shapes need not be multiples of any tile: rows past N / M are clamped (re-read, never stored), K is masked.
  If ``group_size`` is not a multiple of BLOCK_K, BLOCK_K shrinks to a power of two dividing it (>= 16); failing
  that (odd group sizes) scales and zeros are gathered per element.

Everything is CUDA-graph capturable: no host syncs, grids depend only on shapes, and the split-K workspace and
counters are ``decode_linear``'s per-device cache (allocated on an eager call before capture; if a capture finds
them too small, the call runs unsplit instead of allocating). Calls sharing it must be ordered on one stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gpt2serve.kernels import decode_linear as dl
from gpt2serve.kernels.decode_linear import _epilogue  # bias + decode_linear._gelu_tanh + residual, rounded once

DECODE_MAX_M = 16  # rows up to which the small-M (decode) configuration is used

# Launch configurations by regime. "fold": int4 applies scale / zero to each chunk's partial product (decode);
# otherwise the weight tile is dequantized per element. split: "auto" or a fixed count; split_mode: "serial" |
# "two_pass". w_evict: L2 policy of the weight loads ("evict_first": read once, keep x and the partials in L2).
DECODE_CONFIG = {"block_m": 16, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4,
                 "split": "auto", "split_mode": "serial", "w_evict": "evict_first", "fold": True}
PREFILL_SMALL_CONFIG = {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 8, "num_stages": 3,
                        "split": "auto", "split_mode": "serial", "w_evict": "", "fold": False}
PREFILL_CONFIG = {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3,
                  "split": "auto", "split_mode": "serial", "w_evict": "", "fold": False}

# Per-shape overrides of the regime defaults, keyed (bits, K, N, m_bucket) with m_bucket 1 (M == 1) or 16 (the
# rest of the decode regime). Empty until benchmarks/quant_linear_gpu.py --sweep has run on the target GPU (it
# prints entries for this table).
TUNED_CONFIGS: dict[tuple[int, int, int, int], dict] = {}

# Split-K: aim for this many programs per SM (decode wants several in flight to cover HBM latency; prefill
# programs are compute-heavy, one wave is enough) ...
SPLIT_PROGRAMS_PER_SM = {"decode": 2, "prefill": 1}
# ... but leave every split at least this many K columns (below that the partial round trip costs more) ...
SPLIT_MIN_K = 256
SPLIT_MAX = 16
# ... and keep the fp32 partials (split x M x N) within this many elements.
SPLIT_MAX_WS_ELEMS = 1 << 23


# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _unpack_int4(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K // 8] int32 words -> [BLOCK_N, BLOCK_K] int32 values 0..15, column 8w + j from nibble j of
    word w. The shift is arithmetic (sign-extends nibble 7), the mask discards the extension."""
    shifts = tl.arange(0, 8) * 4
    q = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    return tl.reshape(q, (BLOCK_N, BLOCK_K))


@triton.jit(do_not_specialize=["M"])
def _quant_linear_kernel(
    x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, group_size,
    stride_xm, stride_qn, stride_sn, stride_rm, stride_om,
    BITS: tl.constexpr,  # 8: int8 per channel; 4: int4 per group
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr,
    SPLIT_MODE: tl.constexpr,  # 0: no split-K; 1: serial (last arriver reduces); 2: partials only (two-pass)
    GROUP_UNIFORM: tl.constexpr,  # int4: group_size % BLOCK_K == 0, so every K chunk lies in one group
    FOLD: tl.constexpr,  # int4 with GROUP_UNIFORM: scale / zero applied to the chunk's product, not per weight
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    W_EVICT: tl.constexpr,
    W_ALIGN: tl.constexpr,  # int4: a power of two dividing both the row stride and K // 8 (in words)
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    # M tiles vary fastest: programs running together share weight tiles, so each is fetched from HBM ~once.
    pid_m = pid % tiles_m
    pid_n = pid // tiles_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Clamp rather than mask: rows past N / M re-read the last valid row, so the loads need no row predicate;
    # those lanes are never stored.
    rows_w = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_cols = x_ptr + tl.minimum(offs_m, M - 1)[None, :] * stride_xm  # [1, BLOCK_M]: the columns of x^T
    if BITS == 4:
        # The JIT marks only integers divisible by 16; GPT-2 XL's K = 1600 is 200 words a row (divisible by 8),
        # which without these hints turns the weight stream into 4-byte loads.
        w_rows = qw_ptr + tl.multiple_of(rows_w[:, None] * stride_qn, [W_ALIGN, 1])  # [BLOCK_N, 1]
        k_words = tl.multiple_of(K // 8, W_ALIGN)
    else:
        w_rows = qw_ptr + rows_w[:, None] * stride_qn
    act_ty = x_ptr.dtype.element_ty

    n_chunks = tl.cdiv(K, BLOCK_K)
    c_lo = pid_s * n_chunks // n_splits
    c_hi = (pid_s + 1) * n_chunks // n_splits

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for c in range(c_lo, c_hi):
        offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        # x^T chunk [BLOCK_K, BLOCK_M]; past K it must read exactly 0 (int4 padding dequantizes to -z * s).
        if HAS_PERM:
            if EVEN_K:
                kx = tl.load(perm_ptr + offs_k)
            else:
                kx = tl.load(perm_ptr + offs_k, mask=k_ok, other=0)
        else:
            kx = offs_k
        if EVEN_K:
            xt = tl.load(x_cols + kx[:, None], eviction_policy="evict_last")
        else:
            xt = tl.load(x_cols + kx[:, None], mask=k_ok[:, None], other=0.0, eviction_policy="evict_last")

        if BITS == 8:
            if EVEN_K:
                q = tl.load(w_rows + offs_k[None, :], eviction_policy=W_EVICT)
            else:
                q = tl.load(w_rows + offs_k[None, :], mask=k_ok[None, :], other=0, eviction_policy=W_EVICT)
            # |q| <= 127 is exact in fp16 and bf16; the per-channel scale waits until after the loop.
            acc += tl.dot(q.to(act_ty), xt, input_precision=DOT_PRECISION)
        else:
            offs_w = c * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
            if EVEN_K:
                words = tl.load(w_rows + offs_w[None, :], eviction_policy=W_EVICT)
            else:
                words = tl.load(w_rows + offs_w[None, :], mask=(offs_w < k_words)[None, :], other=0,
                                eviction_policy=W_EVICT)
            q = _unpack_int4(words, BLOCK_N, BLOCK_K)
            if GROUP_UNIFORM:
                g = (c * BLOCK_K) // group_size
                s = tl.load(s_ptr + rows_w * stride_sn + g).to(tl.float32)[:, None]
                z = tl.load(z_ptr + rows_w * stride_sn + g).to(tl.float32)[:, None]
                if FOLD:
                    part = tl.dot(q.to(act_ty), xt, input_precision=DOT_PRECISION)
                    xsum = tl.sum(xt.to(tl.float32), axis=0)  # [BLOCK_M]
                    acc += s * (part - z * xsum[None, :])
                else:
                    w = ((q.to(tl.float32) - z) * s).to(act_ty)
                    acc += tl.dot(w, xt, input_precision=DOT_PRECISION)
            else:
                # Groups that do not align with chunks: gather each column's scale and zero (L1 hits).
                sz_off = rows_w[:, None] * stride_sn + (offs_k // group_size)[None, :]
                s = tl.load(s_ptr + sz_off, mask=k_ok[None, :], other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sz_off, mask=k_ok[None, :], other=0.0).to(tl.float32)
                w = ((q.to(tl.float32) - z) * s).to(act_ty)
                acc += tl.dot(w, xt, input_precision=DOT_PRECISION)

    if BITS == 8:
        acc *= tl.load(s_ptr + rows_w).to(tl.float32)[:, None]

    if SPLIT_MODE == 0:
        _epilogue(acc, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                  HAS_BIAS, ACT_GELU, HAS_RES)
    else:
        # Partial tile -> workspace [S, M, N], fp32.
        ws_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        ws_tile = offs_m[None, :] * N + offs_n[:, None]
        tl.store(ws_ptr + pid_s * M * N + ws_tile, acc, mask=ws_mask)
        if SPLIT_MODE == 1:
            # The barrier orders every thread's partial stores before the one thread's gpu-scope release.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == n_splits - 1:
                # Every other split's partial is visible (acquire). Sum in split order, not arrival order:
                # deterministic, and the same order as the two-pass reduction. .cg: never a stale L1 line.
                total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for s_i in range(0, n_splits):
                    total += tl.load(ws_ptr + s_i * M * N + ws_tile, mask=ws_mask, other=0.0, cache_modifier=".cg")
                _epilogue(total, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                          HAS_BIAS, ACT_GELU, HAS_RES)
                # Re-arm for the next launch / graph replay; every split of this tile has arrived already.
                tl.atomic_xchg(cnt_ptr + pid, 0)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, res_ptr, out_ptr, M, N, n_splits, stride_rm, stride_om,
                          HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """split_mode="two_pass": the partials of any M, summed in split order (as the serial mode does) + epilogue."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tile = offs_m[None, :] * N + offs_n[:, None]
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for s_i in range(0, n_splits):
        total += tl.load(ws_ptr + s_i * M * N + tile, mask=mask, other=0.0)
    _epilogue(total, offs_n, offs_m, N, M, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
              HAS_BIAS, ACT_GELU, HAS_RES)


# ----------------------------------------------------------------------------------------------------------------
# Host side: configuration


def _auto_split(tiles: int, k: int, block_k: int, m: int, n: int, regime: str, device: torch.device) -> int:
    want = max(1, round(SPLIT_PROGRAMS_PER_SM[regime] * dl._sm_count(device) / tiles))
    return max(1, min(want, k // SPLIT_MIN_K, triton.cdiv(k, block_k), SPLIT_MAX,
                      SPLIT_MAX_WS_ELEMS // max(1, m * n)))


def resolve_config(bits: int, m: int, n: int, k: int, device, group_size: int | None = None,
                   config: dict | None = None) -> dict:
    """The launch configuration for an [m, k] x [n, k]^T product with ``bits``-bit weights: the regime's
    defaults, overridden by ``config`` (tests, tuning), with block_k fitted to int4 groups and ``split``
    resolved to a number. Adds ``group_uniform`` and the effective ``fold``."""
    device = torch.device(device)
    config = dict(config or {})
    regime = "decode" if m <= DECODE_MAX_M else "prefill"
    if regime == "decode":
        base = {**DECODE_CONFIG, **TUNED_CONFIGS.get((bits, k, n, 1 if m == 1 else 16), {})}
    else:
        base = PREFILL_SMALL_CONFIG if m <= 64 else PREFILL_CONFIG
    cfg = {**base, **config}
    if regime == "prefill" and "block_m" not in config:
        cfg["block_m"] = min(base["block_m"], max(32, triton.next_power_of_2(m)))
    for key in ("block_m", "block_n", "block_k"):  # tl.dot needs every tile dimension >= 16
        cfg[key] = max(16, triton.next_power_of_2(int(cfg[key])))
    uniform = False
    if bits == 4:
        assert group_size is not None and group_size > 0
        if group_size % cfg["block_k"] and "block_k" not in config:
            low_bit = group_size & -group_size  # largest power of two dividing group_size
            if low_bit >= 16:
                cfg["block_k"] = low_bit
        uniform = group_size % cfg["block_k"] == 0
        if not (cfg["fold"] and uniform) and regime == "decode" and "block_k" not in config:
            # Per-element dequantization of a 64 x 128 tile runs out of registers (sm_90, 4 warps).
            cfg["block_k"] = min(cfg["block_k"], 64)
            uniform = group_size % cfg["block_k"] == 0
    cfg["group_uniform"] = uniform
    cfg["fold"] = bool(cfg["fold"]) and uniform
    tiles = triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"])
    split = cfg["split"]
    if split == "auto":
        split = _auto_split(tiles, k, cfg["block_k"], m, n, regime, device)
    cfg["split"] = max(1, min(int(split), triton.cdiv(k, cfg["block_k"])))  # every split gets >= 1 chunk
    cfg["regime"] = regime
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Host side: launch


def _pow2_divisor(v: int, cap: int) -> int:
    return min(v & -v, cap) if v else cap


def _quant_linear(x, bits, qweight, scales, zeros, k, group_size, bias, activation, residual, perm, out, config):
    if activation not in (None, "gelu_tanh", "gelu_new"):
        raise ValueError(f"unsupported activation {activation!r}")
    n = qweight.shape[0]
    assert x.shape[-1] == k, f"x has {x.shape[-1]} features, the weights expect {k}"
    assert qweight.stride(1) == 1, "qweight rows must be contiguous"
    x2 = dl._rows(x, k)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    assert out.shape == out_shape, f"out is {tuple(out.shape)}, expected {out_shape}"
    out2 = out.view(m, n)  # a view: the kernel writes into it
    assert out2.stride(1) == 1
    res2 = None
    if residual is not None:
        assert residual.shape == out_shape, f"residual is {tuple(residual.shape)}, expected {out_shape}"
        res2 = dl._rows(residual, n)
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), f"bias must be contiguous [{n}]"
    assert perm is None or (perm.shape == (k,) and perm.is_contiguous() and not perm.is_floating_point()), \
        f"perm must be a contiguous integer [{k}]"
    if m == 0:
        return out

    cfg = resolve_config(bits, m, n, k, x.device, group_size, config)
    if perm is not None and cfg["regime"] == "prefill":
        # A gathered x tile cannot be staged with contiguous async copies; at prefill sizes one gather pass over
        # x (M x K, a few MB at most) costs less than scalar loads in every program.
        x2 = x2.index_select(1, perm)
        perm = None
    block_m, block_n, block_k, split = cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["split"]
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    ws = cnt = None
    split_mode = 0
    if split > 1:
        scratch = dl._scratch(x.device, split * m * n, tiles)
        if scratch is None:  # graph capture found the cache too small: correct, just not split
            split = 1
        else:
            ws, cnt = scratch
            split_mode = 1 if cfg["split_mode"] == "serial" else 2
    dummy = out2  # pointers of disabled features are never dereferenced
    flags = dict(HAS_BIAS=bias is not None, ACT_GELU=activation is not None, HAS_RES=res2 is not None)
    res_stride = res2.stride(0) if res2 is not None else 0
    _quant_linear_kernel[(tiles, split)](
        x2, perm if perm is not None else dummy, qweight, scales, zeros if zeros is not None else dummy,
        bias if bias is not None else dummy, res2 if res2 is not None else dummy, out2,
        ws if ws is not None else dummy, cnt if cnt is not None else dummy,
        m, n, k, group_size,
        x2.stride(0), qweight.stride(0), scales.stride(0), res_stride, out2.stride(0),
        BITS=bits, HAS_PERM=perm is not None, SPLIT_MODE=split_mode,
        GROUP_UNIFORM=cfg["group_uniform"], FOLD=cfg["fold"],
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, W_EVICT=cfg["w_evict"],
        W_ALIGN=_pow2_divisor(math.gcd(qweight.stride(0), k // 8), 16) if bits == 4 else 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags,
    )
    if split_mode == 2:
        rbm, rbn = 16, 128
        _splitk_reduce_kernel[(triton.cdiv(n, rbn), triton.cdiv(m, rbm))](
            ws, bias if bias is not None else dummy, res2 if res2 is not None else dummy, out2,
            m, n, split, res_stride, out2.stride(0), BLOCK_M=rbm, BLOCK_N=rbn, num_warps=4, **flags,
        )
    return out


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                activation: str | None = None, residual: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``act(x @ (qweight * scales[:, None]).T + bias) + residual``, fp32 accumulation, result in x.dtype.

    x: [..., K] (rows contiguous; a row-strided view is fine); qweight: int8 [N, K]; scales: [N]; bias: [N];
    activation: None or "gelu_tanh"; residual: [..., N], added last (``out`` may alias it). ``config`` overrides
    launch parameters (see ``DECODE_CONFIG``)."""
    assert qweight.dtype == torch.int8 and qweight.dim() == 2, "qweight must be int8 [N, K]"
    n, k = qweight.shape
    assert scales.shape == (n,) and scales.is_contiguous(), f"scales must be contiguous [{n}]"
    return _quant_linear(x, 8, qweight, scales, None, k, 0, bias, activation, residual, None, out, config)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int = 128, bias: torch.Tensor | None = None, activation: str | None = None,
                residual: torch.Tensor | None = None, perm: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``act(x[:, perm] @ dequantize_int4(...).T + bias) + residual``, fp32 accumulation, result in x.dtype.

    qweight: int32 [N, K // 8] (see the module docstring); scales, zeros: [N, ceil(K / group_size)]; perm:
    optional integer [K]. Other arguments as ``int8_linear``."""
    assert qweight.dtype == torch.int32 and qweight.dim() == 2, "qweight must be int32 [N, K // 8]"
    n, k = qweight.shape[0], qweight.shape[1] * 8
    groups = triton.cdiv(k, group_size)
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        assert t.shape == (n, groups) and t.is_contiguous(), f"{name} must be contiguous [{n}, {groups}]"
    return _quant_linear(x, 4, qweight, scales, zeros, k, int(group_size), bias, activation, residual, perm, out,
                         config)


# ----------------------------------------------------------------------------------------------------------------
# Quantization, packing and the PyTorch reference


def _scale_at_least(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales -> ``dtype``, rounded up where nearest rounding went down, and never below the smallest
    normal (this also guards all-zero rows / groups). A stored scale >= the exact one keeps every value inside
    the integer range, so the only error is rounding: <= scale / 2."""
    s = s.clamp_min(torch.finfo(dtype).tiny)
    stored = s.to(dtype)
    bumped = (s * (1.0 + torch.finfo(dtype).eps)).to(dtype)  # one eps up: nearest rounding lands above s
    return torch.where(stored.float() < s, bumped, stored)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel round-to-nearest: returns (qweight int8 [N, K], scales [N] in w's dtype)."""
    assert w.dim() == 2 and w.is_floating_point()
    wf = w.float()
    scales = _scale_at_least(wf.abs().amax(dim=1) / 127.0, w.dtype)
    q = torch.round(wf / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in 0..15 -> int32 [N, K // 8], nibble j of word w = q[:, 8w + j]."""
    n, k = q.shape
    assert k % 8 == 0, f"K = {k} must be a multiple of 8"
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q.to(torch.int64).view(n, k // 8, 8) << shifts).sum(dim=-1)
    # Words with nibble 7 >= 8 exceed int32's range: store their two's complement explicitly.
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K // 8] -> uint8 [N, K] in 0..15. The right shift sign-extends nibble 7; the mask drops it."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF
    return q.reshape(packed.shape[0], packed.shape[1] * 8).to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per group of ``group_size`` input features (the last group may be partial):
    returns (qweight int32 [N, K // 8], scales [N, G], zeros [N, G]), scales and zeros in w's dtype. Each
    group's range is widened to include 0 (as GPTQ does), so the zero point is an integer in 0..15."""
    assert w.dim() == 2 and w.is_floating_point()
    n, k = w.shape
    assert k % 8 == 0, f"K = {k} must be a multiple of 8"
    groups = triton.cdiv(k, group_size)
    wf = w.float()
    # Padding the partial last group with zeros changes nothing: the range includes 0 anyway.
    wg = F.pad(wf, (0, groups * group_size - k)).view(n, groups, group_size)
    lo = wg.amin(dim=-1).clamp_max(0.0)
    hi = wg.amax(dim=-1).clamp_min(0.0)
    scales = _scale_at_least((hi - lo) / 15.0, w.dtype)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp_(0, 15)
    col_group = torch.arange(k, device=w.device) // group_size
    q = (torch.round(wf / s[:, col_group]) + zeros[:, col_group]).clamp_(0, 15)
    return pack_int4(q.to(torch.int32)), scales, zeros.to(w.dtype)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 [N, K] matrix the int8 kernel multiplies by."""
    return qweight.float() * scales.float()[:, None]


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int = 128) -> torch.Tensor:
    """The fp32 [N, K] matrix the int4 kernel multiplies by."""
    q = unpack_int4(qweight).float()
    col_group = torch.arange(q.shape[1], device=q.device) // group_size
    return (q - zeros.float()[:, col_group]) * scales.float()[:, col_group]


def _linear_ref(x, w, bias, activation, residual, perm):
    """The one reference path: fp32 throughout, rounded once to x.dtype."""
    if activation not in (None, "gelu_tanh", "gelu_new"):
        raise ValueError(f"unsupported activation {activation!r}")
    h = x.float()
    if perm is not None:
        h = h[..., perm.long()]
    y = F.linear(h, w, None if bias is None else bias.float())
    if activation is not None:
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def int8_linear_ref(x, qweight, scales, bias=None, activation=None, residual=None):
    """PyTorch reference of ``int8_linear`` (dequantize in fp32, F.linear in fp32)."""
    return _linear_ref(x, dequantize_int8(qweight, scales), bias, activation, residual, None)


def int4_linear_ref(x, qweight, scales, zeros, group_size=128, bias=None, activation=None, residual=None,
                    perm=None):
    """PyTorch reference of ``int4_linear`` (dequantize in fp32, F.linear in fp32)."""
    return _linear_ref(x, dequantize_int4(qweight, scales, zeros, group_size), bias, activation, residual, perm)
