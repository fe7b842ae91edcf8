"""How a draft model draws its proposals: greedy requests take the argmax; sampled ones draw from the draft's
distribution after the request's temperature, top-k, top-p and min-p (``Sampler.probs``, the rules the target's
distribution follows) and report it as ``Proposal.probs``: the q of the rejection rule
(``engine/spec_decode/rejection.py``).

The runner does not speculate for requests with penalties, so none are applied here. (The rule would stay exact
for any q as long as the proposal was drawn from the q reported; a q farther from the target's p only lowers the
acceptance rate.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpt2serve.engine.sampler import Sampler, SamplingRow, exponential_race
from gpt2serve.engine.spec_decode.proposer import ProposalRequest

# Seeded draft draws are keyed like the target's, (seed, sample index, output position), then salted: with the
# target's own noise at the same position, a proposal and the rejection rule's draws there would be correlated,
# and the rule assumes they are independent.
_SEED_SALT = 0x2545F4914F6CDD1D


@dataclass
class DrawPlan:
    """The sampled rows of one propose call, fixed over its passes. The batch is sorted by proposal count, longest
    first, so the rows still drawing proposal d are always a prefix of these."""

    rows: torch.Tensor  # [S] long: the sampled rows of the batch, ascending
    row_ids: list[int]
    nums: np.ndarray  # [S] each row's proposal count
    sampling: list[SamplingRow]  # their output position is that of their first proposal
    probs: torch.Tensor  # [S, max num, vocab] float32: the distribution each proposal was drawn from

    def probs_by_row(self) -> dict[int, torch.Tensor]:
        return {row: self.probs[s] for s, row in enumerate(self.row_ids)}


class DraftSampling:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.sampler = Sampler(device, seed ^ _SEED_SALT)  # its generator draws the unseeded rows' noise

    def plan(self, reqs: list[ProposalRequest], nums: np.ndarray, vocab: int) -> DrawPlan | None:
        """None when every row is greedy (the argmax is then all there is to draw)."""
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if not sampled:
            return None
        return DrawPlan(
            rows=torch.tensor(sampled, dtype=torch.long, device=self.device), row_ids=sampled, nums=nums[sampled],
            sampling=[SamplingRow(reqs[i].params, reqs[i].token_ids, reqs[i].num_prompt_tokens, reqs[i].sample_index)
                      for i in sampled],
            # Entries past a row's own count are never read (its Proposal.probs is sliced to it).
            probs=torch.empty((len(sampled), int(nums[0]), vocab), dtype=torch.float32, device=self.device),
        )

    def draw(self, logits: torch.Tensor, plan: DrawPlan | None, d: int) -> torch.Tensor:
        """Proposal ``d`` of each row still drawing (``logits`` holds exactly those rows)."""
        tokens = logits.argmax(dim=-1)
        if plan is None:
            return tokens
        m = int((plan.nums > d).sum())
        if m == 0:
            return tokens
        rows = plan.rows[:m]
        probs = self.sampler.probs(logits[rows], plan.sampling[:m])
        noise = self.sampler.exponential_noise(plan.sampling[:m], probs.shape[1], offset=d, salt=_SEED_SALT)
        tokens[rows] = exponential_race(probs, noise)
        plan.probs[:m, d] = probs
        return tokens
