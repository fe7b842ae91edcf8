"""The attention-backend interface and the per-step metadata every backend reads.

The model never sees block tables directly: each layer hands its q/k/v, its slice of the KV pool and one
``AttentionMetadata`` to the backend, which writes the new K/V into their slots and attends over the paged
context. The metadata is built once per step by the model runner and passed explicitly (no global context).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kernels.attention_ref import paged_attention_ref, write_kv_ref


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes; -1 = padding, not stored
    query_start_loc: torch.Tensor  # [B + 1] int32: offsets of each sequence's new tokens in the flat batch
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence once this step's tokens are in
    block_tables: torch.Tensor  # [B, max_blocks] int32: the blocks holding each sequence's context
    max_query_len: int
    max_seq_len: int


class AttentionBackend(ABC):
    """Writes this step's K/V into the pool, then attends each new token over its sequence's context."""

    name: str

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, H, D]
        v: torch.Tensor,  # [T, H, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, H, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        ...


class TorchAttentionBackend(AttentionBackend):
    """The PyTorch reference: exact and portable, used on the CPU and as the yardstick for the kernels."""

    name = "torch"

    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv_ref(k, v, kv_cache, meta.slot_mapping)
        return paged_attention_ref(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, meta.max_seq_len, scale,
        )


def _triton_backend() -> AttentionBackend:
    from kernels.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend()


_BACKENDS = {"torch": TorchAttentionBackend, "triton": _triton_backend}


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` picks Triton on CUDA when it is available, the PyTorch reference elsewhere."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            try:
                import kernels.triton_backend  # noqa: F401

                name = "triton"
            except ImportError:
                pass
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS) + ['auto']}")
    return _BACKENDS[name]()
