"""Prompt lookup (n-gram) proposals: find the request's last n tokens earlier in its own context and propose what
followed them there. Free to run, and right surprisingly often when the output quotes or edits its input (code,
retrieval answers, summaries)."""

from __future__ import annotations

from gpt2serve.engine.spec_decode.proposer import PROPOSERS, Proposal, ProposalRequest, Proposer


@PROPOSERS.register("ngram")
class NgramProposer(Proposer):
    """Tries n = ``prompt_lookup_max`` down to ``prompt_lookup_min``; the most recent earlier match wins."""

    def __init__(self, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4, **_: object):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, batch: list[ProposalRequest]) -> dict[str, Proposal]:
        out = {}
        for r in batch:
            tokens = self.lookup(r.token_ids, r.num_tokens)
            if tokens:
                out[r.req_id] = Proposal(tokens)
        return out

    def lookup(self, ids: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            tail = ids[-n:]
            # Scan backwards from the latest possible start: the most recent occurrence is the likeliest to repeat.
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + k]
                    if follow:
                        return follow
        return []
