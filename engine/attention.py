"""The attention-backend interface and the per-step metadata every backend reads.

The model never sees block tables directly: each layer hands its q/k/v, its slice of the KV pool and one
``AttentionMetadata`` to the backend, which writes the new K/V into their slots and attends over the paged
context. The metadata is built once per step by the model runner and passed explicitly (no global context).
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Callable

import numpy as np
import torch

from gpt2serve.kernels.attention_ref import paged_attention_ref, write_kv_ref


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes; -1 = padding, not stored
    query_start_loc: torch.Tensor  # [B + 1] int32: offsets of each sequence's new tokens in the flat batch
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence once this step's tokens are in
    block_tables: torch.Tensor  # [B, max_blocks] int32: the blocks holding each sequence's context
    max_query_len: int
    max_seq_len: int
    # Decode-only steps whose sequences share leading blocks: how to split each context into the shared prefix and
    # the sequence's own suffix (backends that attend over the full tables, like the torch one, may ignore it).
    cascade: CascadeMetadata | None = None
    # Not attention, but per-token like the rest: each row's LoRA slot (-1: none); None when no row has an adapter.
    lora_slots: torch.Tensor | None = None

    def split(self, parts: int, query_start_loc: list[int]) -> list[tuple[int, int, AttentionMetadata]]:
        """The step as up to ``parts`` consecutive groups of whole sequences with about equal token counts (a
        pipeline's micro-batches): ``(first token row, end row, the group's metadata)``. ``query_start_loc``: this
        metadata's, on the host. Each group keeps the step's ``max_*`` lengths, which stay valid bounds; a cascade
        plan spans the whole step, so a step that has one is not split."""
        num_seqs, total = len(query_start_loc) - 1, query_start_loc[-1]
        if parts <= 1 or num_seqs <= 1 or self.cascade is not None:
            return [(0, total, self)]
        bounds = [0]
        for i in range(1, parts):
            # The sequence start nearest to i / parts of the tokens, after the previous group's first sequence.
            target = total * i / parts
            j = bisect.bisect_left(query_start_loc, target, bounds[-1] + 1, num_seqs)
            if j > bounds[-1] + 1 and target - query_start_loc[j - 1] < query_start_loc[j] - target:
                j -= 1
            if j >= num_seqs:
                break
            bounds.append(j)
        bounds.append(num_seqs)
        groups = []
        for a, b in zip(bounds, bounds[1:]):
            t0, t1 = query_start_loc[a], query_start_loc[b]
            groups.append((t0, t1, replace(
                self, slot_mapping=self.slot_mapping[t0:t1], query_start_loc=self.query_start_loc[a:b + 1] - t0,
                seq_lens=self.seq_lens[a:b], block_tables=self.block_tables[a:b],
                lora_slots=None if self.lora_slots is None else self.lora_slots[t0:t1])))
        return groups


# Shared groups one cascade step may have. The CUDA graphs of cascade steps are captured with room for this many
# (plus the trailing group of rows that share nothing), so every plan must fit; a batch rarely has more than a few
# prompts shared by enough sequences to matter, and the groups left out still decode correctly, unshared.
MAX_CASCADE_GROUPS = 4


@dataclass
class CascadeMetadata:
    """Groups of decode rows that share their first blocks, for ``kernels/cascade_attention.py``.

    Group g's rows (= tokens = sequences: one token each) are ``group_rows[group_query_start[g]:...[g + 1]]``;
    they share the first ``prefix_lens[g]`` tokens (whole blocks, in ``prefix_tables[g]``). Every row of the batch
    is in exactly one group: rows that share nothing come last, as a group of prefix length 0. Arrays are numpy
    on the host (as ``find_shared_prefixes`` builds them) and tensors on the device (``to_device``).
    """

    group_query_start: torch.Tensor  # [G + 1] int32
    group_rows: torch.Tensor  # [B] int32
    prefix_tables: torch.Tensor  # [G, max_prefix_blocks] int32; entries past a group's prefix are never read
    prefix_lens: torch.Tensor  # [G] int32, multiples of block_size
    suffix_tables: torch.Tensor  # [B, max_blocks] int32: each row's table with its group's prefix blocks dropped
    suffix_lens: torch.Tensor  # [B] int32: seq_len minus the group's prefix, always >= 1
    max_group_size: int
    max_prefix_len: int
    max_suffix_len: int
    num_shared_groups: int  # groups with a prefix (the trailing prefix-less group not counted)
    # Fixed split-K counts of the prefix and suffix passes; None lets the kernels choose from the max_* above. A CUDA
    # graph fixes them per bucket, since its launches cannot change with the step.
    prefix_splits: int | None = None
    num_splits: int | None = None

    def to_device(self, to_dev: Callable[[np.ndarray, torch.dtype, str], torch.Tensor]) -> CascadeMetadata:
        """The same plan with every array moved by ``to_dev(array, dtype, name)`` (the runner's pinned staging)."""
        arrays = {f.name: to_dev(getattr(self, f.name), torch.int32, "cascade_" + f.name)
                  for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, **arrays)


def find_shared_prefixes(tables: np.ndarray, seq_lens: np.ndarray, block_size: int, min_group: int,
                         min_tokens: int, max_groups: int = MAX_CASCADE_GROUPS) -> CascadeMetadata | None:
    """Group decode rows by their first block and find each group's shared leading blocks; None if none is worth it.

    ``tables`` [B, W] and ``seq_lens`` [B] are the step's block tables and context lengths. A group is the rows
    whose first block is the same id, if there are at least ``min_group`` of them; its prefix is the leading run of
    block columns equal across the whole group, capped so that every member keeps at least one token of its own
    (the suffix pass attends to the new token's key, and a prefix of whole blocks can then never reach past any
    member's context, where stale table entries live). Groups sharing fewer than ``min_tokens`` tokens stay with
    the ordinary rows, and so do all but the ``max_groups`` groups that save the most reads (rows x shared
    blocks). Runs every step of a decode batch, so it is vectorised over rows and groups (no loop).
    """
    tables = np.asarray(tables)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    batch, width = tables.shape
    if batch < min_group:
        return None
    _, inverse, counts = np.unique(tables[:, 0], return_inverse=True, return_counts=True)
    if counts.max() < min_group:
        return None  # the usual step: nobody shares a first block
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")  # rows, group after group
    starts = np.cumsum(counts) - counts
    sorted_tables = tables[order]
    # Per group: the first column where some member differs from the group's first row, and the cap.
    differs = sorted_tables != sorted_tables[starts][np.repeat(np.arange(len(counts)), counts)]
    differs = np.logical_or.reduceat(differs, starts, axis=0)
    run = np.where(differs.any(axis=1), differs.argmax(axis=1), width)
    cap = (np.minimum.reduceat(seq_lens[order], starts) - 1) // block_size
    shared = np.minimum(run, cap)
    kept = (counts >= min_group) & (shared * block_size >= max(min_tokens, 1))
    if not kept.any():
        return None
    if kept.sum() > max_groups:
        saved = np.where(kept, counts * shared, -1)
        kept = np.zeros_like(kept)
        kept[np.argsort(-saved, kind="stable")[:max_groups]] = True

    groups = np.nonzero(kept)[0]
    row_kept = kept[inverse]
    rest = np.nonzero(~row_kept)[0]  # rows sharing nothing worth it: the trailing group of prefix length 0
    tail = [len(rest)] if len(rest) else []
    sizes = np.concatenate([counts[groups], tail]).astype(np.int64)
    prefix_blocks = np.concatenate([shared[groups], [0] * len(tail)]).astype(np.int64)
    group_query_start = np.zeros(len(sizes) + 1, dtype=np.int32)
    np.cumsum(sizes, out=group_query_start[1:])
    prefix_tables = np.zeros((len(sizes), int(prefix_blocks.max())), dtype=np.int32)
    prefix_tables[:len(groups)] = tables[order[starts[groups]], :prefix_tables.shape[1]]

    shift = np.where(kept, shared, 0)[inverse]  # each row's prefix, in blocks
    suffix_lens = seq_lens - shift * block_size
    assert (suffix_lens >= 1).all()
    # Only as many columns as the longest suffix needs; entries past a row's context are never read.
    suffix_width = -(-int(suffix_lens.max()) // block_size)
    cols = np.minimum(np.arange(suffix_width)[None, :] + shift[:, None], width - 1)
    suffix_tables = np.ascontiguousarray(tables).ravel().take(cols + np.arange(batch)[:, None] * width)
    return CascadeMetadata(
        group_query_start=group_query_start,
        group_rows=np.concatenate([order[row_kept[order]], rest]).astype(np.int32),
        prefix_tables=prefix_tables,
        prefix_lens=(prefix_blocks * block_size).astype(np.int32),
        suffix_tables=suffix_tables.astype(np.int32, copy=False),
        suffix_lens=suffix_lens.astype(np.int32),
        max_group_size=int(sizes.max()),
        max_prefix_len=int(prefix_blocks.max()) * block_size,
        max_suffix_len=int(suffix_lens.max()),
        num_shared_groups=len(groups),
    )


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
    """The PyTorch reference: exact and portable, used on the CPU and as the yardstick for the kernels. It attends
    over the full block tables, so it ignores ``meta.cascade`` (the split into prefix and suffix is only a way to
    read shared blocks fewer times)."""

    name = "torch"

    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv_ref(k, v, kv_cache, meta.slot_mapping)
        return paged_attention_ref(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, meta.max_seq_len, scale,
        )


def _triton_backend() -> AttentionBackend:
    from gpt2serve.kernels.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend()


_BACKENDS = {"torch": TorchAttentionBackend, "triton": _triton_backend}


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` picks Triton on CUDA when it is available, the PyTorch reference elsewhere."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            try:
                import gpt2serve.kernels.triton_backend  # noqa: F401

                name = "triton"
            except ImportError:
                pass
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS) + ['auto']}")
    return _BACKENDS[name]()
