"""PyTorch reference for paged attention and for writing K/V into the paged pool.

These are the ground truth the Triton kernels in this directory are tested against, and the attention
backend the engine uses on the CPU. They favour clarity over speed, but stay vectorised (no Python loop over
sequences) so that CPU tests and the first GPU figures are not dominated by interpreter overhead.

Pool layout, shared by every backend: one tensor per layer, ``kv_cache[2, num_blocks, block_size, H, D]``
(index 0 holds keys, 1 values). Token ``p`` of a sequence lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; its *slot* is ``block * block_size + offset``.
"""

from __future__ import annotations

import torch


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``k``/``v`` ([T, H, D]) at ``slot_mapping`` ([T], -1 = padding token, not stored)."""
    num_heads, head_dim = kv_cache.shape[-2:]
    flat = kv_cache.view(2, -1, num_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat[0, slots] = k[valid].to(kv_cache.dtype)
    flat[1, slots] = v[valid].to(kv_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,  # [T, H, D], the new tokens of every sequence, concatenated
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, H, D], already holding the new tokens' K/V
    block_tables: torch.Tensor,  # [B, max_blocks], int
    seq_lens: torch.Tensor,  # [B], context length including the new tokens
    query_start_loc: torch.Tensor,  # [B + 1], offsets of each sequence's tokens in q
    max_query_len: int,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context.

    The ``i``-th of a sequence's ``q_len`` new tokens sits at position ``seq_len - q_len + i`` and sees the keys
    at positions up to and including its own. Computed in float32, returned in ``q.dtype``.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size = kv_cache.shape[2]
    batch = seq_lens.shape[0]
    device = q.device
    seq_lens = seq_lens.long()
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]

    # Gather every sequence's context from the pool: [B, L, H, D].
    pos = torch.arange(max_seq_len, device=device)
    blocks = block_tables.long()[:, pos // block_size]
    slots = blocks * block_size + pos % block_size
    flat = kv_cache.view(2, -1, num_heads, head_dim)
    keys = flat[0][slots].float()
    values = flat[1][slots].float()

    # Scatter queries into a padded [B, max_q, H, D] tensor.
    tok_seq = torch.repeat_interleave(torch.arange(batch, device=device), q_lens)
    tok_idx = torch.arange(num_tokens, device=device) - starts[tok_seq]
    q_pad = q.new_zeros((batch, max_query_len, num_heads, head_dim), dtype=torch.float32)
    q_pad[tok_seq, tok_idx] = q.float()

    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_query_len, device=device)[None, :]
    visible = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < seq_lens[:, None, None])
    scores = torch.einsum("bqhd,bkhd->bhqk", q_pad, keys) * scale
    scores = scores.masked_fill(~visible[:, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, values)
    return out[tok_seq, tok_idx].to(q.dtype)
