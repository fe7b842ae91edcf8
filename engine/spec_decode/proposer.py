"""The proposer interface: guess each request's next k tokens, cheaply, for the target to verify in one pass.

A proposer lives in the model runner (so that a draft model can keep its distributions on the device for the
rejection rule). After each step's sampling the runner asks it for the next step's proposals; the scheduler then
schedules ``1 + len(proposal)`` tokens for that request. Proposers are chosen by name in YAML
(``speculative: {method: ngram | draft_model, num_speculative_tokens: k, ...}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from gpt2serve.engine.sampling_params import SamplingParams
from gpt2serve.policies.registry import Registry


@dataclass
class ProposalRequest:
    req_id: str
    token_ids: list[int]  # prompt + output so far; the target has computed K/V for all but the last one
    num_prompt_tokens: int
    num_tokens: int  # how many to propose at most (k, or fewer near max_tokens)
    params: SamplingParams
    sample_index: int = 0


@dataclass
class Proposal:
    token_ids: list[int]  # at most num_tokens
    # The proposer's distribution at each proposed position, [len(token_ids), vocab] on the runner's device, when
    # it drew its tokens from one (a draft model sampling); None for deterministic proposals (n-gram lookup, and
    # greedy drafts), which the rejection rule treats as one-hot.
    probs: torch.Tensor | None = None


class Proposer:
    name: str

    def propose(self, batch: list[ProposalRequest]) -> dict[str, Proposal]:
        """Proposals for some of ``batch`` (a request left out, or given no tokens, decodes normally)."""
        raise NotImplementedError

    def drop(self, req_ids: Iterable[str]) -> None:
        """These requests finished or were preempted: forget whatever state the proposer kept for them."""

    def stats(self) -> dict[str, float | int]:
        return {}


PROPOSERS: Registry[Proposer] = Registry("proposer")


def build_proposer(config, device: torch.device, dtype: torch.dtype, backend) -> Proposer | None:
    """The proposer ``config.speculative`` names, or None when speculation is off. Built before the target's KV
    pool is sized, so that a draft model's weights and pool are accounted for."""
    spec = config.speculative
    if spec is None:
        return None
    if spec.method == "ngram":
        from gpt2serve.engine.spec_decode.ngram import NgramProposer

        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    from gpt2serve.engine.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer(config, device, dtype, backend)
