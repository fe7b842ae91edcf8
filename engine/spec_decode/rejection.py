"""Verification of proposed tokens: which of them the target accepts, and the token that follows.

Greedy requests accept the longest run of proposals equal to the target's argmax, then emit the target's argmax
at the first mismatch (or after the last proposal, the "bonus" token): the output is exactly the target's greedy
output, only faster.

Sampled requests use the rule of Leviathan et al. (2023) and Chen et al. (2023): proposal ``d_i``, drawn from the
proposer's distribution ``q_i``, is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))`` where ``p_i`` is the
target's (processed) distribution; at the first rejection the emitted token is drawn from ``max(0, p_i - q_i)``
renormalised, and if all are accepted the bonus token is drawn from ``p_{k+1}``. Every emitted token is then
distributed exactly as the target alone would have drawn it. A proposer that has no distribution (n-gram lookup
proposes deterministically) has ``q_i`` = one-hot on its proposal: acceptance probability ``p_i(d_i)``, and a
rejection resamples from ``p_i`` with ``d_i`` removed.
"""

from __future__ import annotations

import torch

from gpt2serve.engine.sampler import exponential_race


def rejection_sample(
    draft_ids: torch.Tensor,  # [B, k] long; entries past a row's num_drafts are ignored
    num_drafts: torch.Tensor,  # [B] long, 0..k
    target_probs: torch.Tensor,  # [B, k + 1, V] float: the target's distribution at each verified position
    draft_probs: torch.Tensor | None,  # [B, k, V] float, or None for proposers without a distribution
    greedy: torch.Tensor,  # [B] bool
    uniforms: torch.Tensor,  # [B, k] float in [0, 1): one acceptance draw per proposal
    noise: torch.Tensor,  # [B, k + 1, V] float ~ Exp(1): for the token emitted at each position
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (tokens [B, k + 1], num_emitted [B]): row b emits ``tokens[b, :num_emitted[b]]``, which is its
    accepted proposals followed by one token of the target's (so 1 <= num_emitted <= num_drafts + 1)."""
    batch, k = draft_ids.shape
    positions = torch.arange(k, device=draft_ids.device)
    valid = positions[None, :] < num_drafts[:, None]
    safe_ids = draft_ids.clamp_min(0)
    p_draft = target_probs[:, :k].gather(2, safe_ids[:, :, None])[:, :, 0]  # p_i(d_i)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, safe_ids[:, :, None])[:, :, 0]
    argmax = target_probs.argmax(dim=-1)  # [B, k + 1]
    sampled_ok = uniforms * q_draft < p_draft  # u < p/q without dividing by a q that may underflow
    greedy_ok = draft_ids == argmax[:, :k]
    ok = torch.where(greedy[:, None], greedy_ok, sampled_ok) & valid
    num_accepted = ok.long().cumprod(dim=1).sum(dim=1)  # the leading run of acceptances

    # The token after the accepted run, at position j = num_accepted: a rejection's residual if j < num_drafts,
    # else the bonus from p_{k+1}... p_j itself. Computed for every position, then the one at j is taken.
    if draft_probs is None:
        one_hot = torch.zeros_like(target_probs[:, :k]).scatter_(2, safe_ids[:, :, None], 1.0)
        residual = (target_probs[:, :k] - one_hot).clamp_min(0.0)
    else:
        residual = (target_probs[:, :k] - draft_probs).clamp_min(0.0)
    rejected_here = positions[None, :] < num_drafts[:, None]  # a non-accepted proposal at i < n is a rejection
    dist = torch.cat([torch.where(rejected_here[:, :, None], residual, target_probs[:, :k]),
                      target_probs[:, k:]], dim=1)
    # Rounding can leave a residual with no mass (p and q equal to the last bit): fall back to p there.
    empty = dist.sum(dim=-1, keepdim=True) <= 0
    dist = torch.where(empty, target_probs, dist)
    after = torch.where(greedy[:, None], argmax, exponential_race(dist, noise))  # [B, k + 1]

    tokens = torch.cat([draft_ids, torch.zeros_like(draft_ids[:, :1])], dim=1)
    rows = torch.arange(batch, device=draft_ids.device)
    tokens[rows, num_accepted] = after[rows, num_accepted]
    return tokens, num_accepted + 1


def greedy_accept(draft_ids: torch.Tensor, num_drafts: torch.Tensor,
                  target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rejection_sample`` for a batch of greedy rows, from the target's argmax alone ([B, k + 1]): no softmax
    over the vocabulary, no random draws."""
    batch, k = draft_ids.shape
    valid = torch.arange(k, device=draft_ids.device)[None, :] < num_drafts[:, None]
    num_accepted = ((draft_ids == target_argmax[:, :k]) & valid).long().cumprod(dim=1).sum(dim=1)
    tokens = torch.cat([draft_ids, torch.zeros_like(draft_ids[:, :1])], dim=1)
    rows = torch.arange(batch, device=draft_ids.device)
    tokens[rows, num_accepted] = target_argmax[rows, num_accepted]
    return tokens, num_accepted + 1
