"""Triton kernel storing a step's new K/V into the paged pool (same semantics as ``write_kv_ref``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_slot, stride_ch,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    # Padding tokens (CUDA-graph filler) have no slot: storing them would clobber a live block.
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_h[:, None] < num_heads
    src_k = k_ptr + tok.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = v_ptr + tok.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst = slot * stride_slot + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``k``/``v`` ([T, H, D]) at ``slot_mapping`` ([T], -1 = padding token, not stored)."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert kv_cache.shape[0] == 2 and kv_cache.shape[-2:] == (num_heads, head_dim)
    assert kv_cache.is_contiguous(), "the pool layout is [2, num_blocks, block_size, H, D], contiguous"
    assert slot_mapping.shape[0] == num_tokens
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two (tl.arange)"
    # k/v are often views of a fused qkv projection: any token/head stride is fine, but D must be unit-stride.
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache[0], kv_cache[1], slot_mapping,
        num_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_heads * head_dim, head_dim,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        num_warps=4,
    )
