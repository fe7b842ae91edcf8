"""The Triton attention backend: ``write_kv`` then ``paged_attention`` (or ``cascade_attention`` when the runner
found sequences sharing leading blocks), all Triton kernels."""

from __future__ import annotations

import torch

from gpt2serve.engine.attention import AttentionBackend, AttentionMetadata
from gpt2serve.kernels.cascade_attention import cascade_attention
from gpt2serve.kernels.kv_write import write_kv
from gpt2serve.kernels.paged_attention import paged_attention


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
        c = meta.cascade
        if c is not None:
            return cascade_attention(
                q, kv_cache, meta.query_start_loc, c.prefix_tables, c.prefix_lens, c.group_query_start,
                c.group_rows, c.suffix_tables, c.suffix_lens, c.max_group_size, c.max_prefix_len, c.max_suffix_len,
                scale, num_splits=c.num_splits, prefix_splits=c.prefix_splits,
            )
        return paged_attention(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, meta.max_seq_len, scale,
        )
