"""The Triton attention backend: ``write_kv`` then ``paged_attention``, both Triton kernels."""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from kernels.kv_write import write_kv
from kernels.paged_attention import paged_attention


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        return paged_attention(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, meta.max_seq_len, scale,
        )
