"""Fused elementwise kernels for the GPT-2 block, each next to its PyTorch reference.

* ``add_layernorm``: residual add + LayerNorm in one pass over the row (the unfused path reads the sum back
  from memory just to normalise it).
* ``bias_gelu``: the MLP's ``c_fc`` bias add + GPT-2's tanh GELU ("gelu_new"), so the matmul can run without
  its bias epilogue and the 4x-wide activation is read and written once.

Both compute in fp32 and round once on the way out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

def add_layernorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LayerNorm(x + residual), x + residual)``; with ``residual=None``, ``(LayerNorm(x), x)``."""
    new_residual = x if residual is None else x + residual
    normed = F.layer_norm(new_residual.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return normed.to(x.dtype), new_residual


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x + bias)`` computed in fp32, returned in ``x.dtype``."""
    return F.gelu(x.float() + bias.float(), approximate="tanh").to(x.dtype)


@triton.jit
def _add_layernorm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr,
    n_cols, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h_low = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, h_low, mask=mask)
        # Normalise the rounded sum, i.e. exactly the residual the next block adds to: same as the unfused path.
        h = h_low.to(tl.float32)
    else:
        h = x
    mean = tl.sum(h, axis=0) / n_cols
    diff = tl.where(mask, h - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (diff * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(1) == 1 else t.contiguous()


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``add_layernorm_ref``: returns ``(normed, new_residual)`` shaped like ``x``."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    rows = x2.shape[0]
    normed = torch.empty_like(x2)
    if residual is None:
        res2, new_res = x2, x
    else:
        assert residual.shape == x.shape
        res2 = _rows(residual, n)
        new_res = torch.empty_like(x2)
    if rows == 0:
        return normed.view(x.shape), (new_res if residual is None else new_res.view(x.shape))
    block_n = triton.next_power_of_2(n)
    # ~8 elements (one 16-byte fp16 vector) per thread on wide rows, a single warp on narrow ones.
    num_warps = max(1, min(8, block_n // 256))
    _add_layernorm_kernel[(rows,)](
        x2, res2, weight, bias, normed, new_res if residual is not None else normed,
        n, eps,
        x2.stride(0), res2.stride(0), normed.stride(0),
        new_res.stride(0) if residual is not None else 0,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=num_warps,
    )
    normed = normed.view(x.shape)
    return normed, (new_res if residual is None else new_res.view(x.shape))


@triton.jit
def _bias_gelu_kernel(x_ptr, b_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    h = h + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2/pi) * (h + 0.044715 h^3)
    # 0.5 * (1 + tanh(u)) == sigmoid(2u). Evaluated through z = exp(-2|u|) in (0, 1], which never overflows.
    z = tl.exp(-2.0 * tl.abs(inner))
    y = h * tl.where(inner >= 0, 1.0, z) / (1.0 + z)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fused ``bias_gelu_ref``: ``gelu_tanh(x + bias)`` over the last dimension, shaped like ``x``."""
    n = x.shape[-1]
    assert bias.shape == (n,)
    x2 = _rows(x, n)
    out = torch.empty_like(x2)
    if x2.shape[0] == 0:
        return out.view(x.shape)
    block_n = min(1024, triton.next_power_of_2(n))
    _bias_gelu_kernel[(x2.shape[0], triton.cdiv(n, block_n))](
        x2, bias, out, n, x2.stride(0), out.stride(0),
        BLOCK_N=block_n, num_warps=max(1, min(4, block_n // 256)),
    )
    return out.view(x.shape)
