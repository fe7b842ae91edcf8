"""Sampling for the whole batch at once: penalties, temperature, top-k / top-p / min-p, seeds, logprobs.

Logprobs are those of the model's raw distribution (log-softmax of the logits before any penalty or
truncation), as vLLM and the OpenAI API report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2serve.engine.request import TokenLogprobs
from gpt2serve.engine.sampling_params import SamplingParams

_SEED_MASK = (1 << 63) - 1


@dataclass
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # prompt + output; sliced only when a penalty needs it
    num_prompt_tokens: int
    sample_index: int

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


def position_seed(seed: int, sample_index: int, position: int) -> int:
    """The seed of one draw depends only on (request seed, sample, output position): a seeded request gives
    the same tokens whatever it is batched with and however often it is preempted."""
    return (seed * 1_000_003 + sample_index * 104_729 + position * 7_919 + 1) & _SEED_MASK


def exponential_race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw from unnormalised ``probs`` (last dim) with Exp(1) ``noise``: argmax(p / E) is distributed as p. A
    masked token has p = 0; clamping keeps 0 / 0 (NaN, which argmax would pick) out."""
    return (probs / noise.clamp_min(1e-20)).argmax(dim=-1)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """For each row: the chosen token's logprob and rank (1 = most likely), and the ``num_top[i]`` best."""
    chosen = logprobs.gather(1, tokens[:, None])
    ranks = (logprobs > chosen).sum(dim=1) + 1
    k = max(num_top, default=0)
    top_vals, top_ids = logprobs.topk(k, dim=1) if k else (None, None)
    chosen, ranks, tokens = chosen[:, 0].tolist(), ranks.tolist(), tokens.tolist()
    top_vals = top_vals.tolist() if k else None
    top_ids = top_ids.tolist() if k else None
    result = []
    for i, n in enumerate(num_top):
        top = list(zip(top_ids[i][:n], top_vals[i][:n])) if n else []
        result.append(TokenLogprobs(tokens[i], chosen[i], ranks[i], top))
    return result


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprobs | None]]:
        want_logprobs = [r.params.logprobs is not None for r in rows]
        greedy = [r.params.greedy for r in rows]
        if all(greedy) and not any(want_logprobs) and not any(_has_penalty(r.params) for r in rows):
            return logits.argmax(dim=-1).tolist(), [None] * len(rows)  # the common benchmark case
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        logits = self._apply_penalties(logits, rows)
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            sampled = self._sample(logits, rows)
            tokens = torch.where(torch.tensor(greedy, device=self.device), tokens, sampled)

        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            idx = [i for i, w in enumerate(want_logprobs) if w]
            sel = torch.tensor(idx, device=self.device)
            for i, lp in zip(idx, token_logprobs(raw_logprobs[sel], tokens[sel], [rows[i].params.logprobs for i in idx])):
                logprobs[i] = lp
        return tokens.tolist(), logprobs

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        need = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
        if not need:
            return logits
        vocab = logits.shape[1]
        for i in need:  # rows with penalties are rare; one vectorised pass each keeps this simple
            p = rows[i].params
            row = logits[i]
            out_ids = torch.tensor(rows[i].output_token_ids, dtype=torch.long, device=self.device)
            counts = torch.zeros(vocab, device=self.device).index_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float))
            if p.repetition_penalty != 1.0:
                seen = counts > 0
                seen[torch.tensor(rows[i].prompt_token_ids, dtype=torch.long, device=self.device)] = True
                penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row = torch.where(seen, penalised, row)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
            logits[i] = row
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        # The race needs no normalised p.
        probs = self.probs(logits, rows, normalise=False)
        return exponential_race(probs, self.exponential_noise(rows, logits.shape[1]))

    def _row_generator(self, r: SamplingRow, offset: int, salt: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            position_seed(r.params.seed, r.sample_index, r.num_output_tokens + offset) ^ salt)

    def exponential_noise(self, rows: list[SamplingRow], vocab: int, offset: int = 0, salt: int = 0) -> torch.Tensor:
        """Exp(1) draws, [rows, vocab]: a seeded row's depend only on (seed, sample, output position + ``offset``)
        and ``salt`` (which keeps independent uses of one position apart)."""
        noise = torch.empty((len(rows), vocab), device=self.device).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.params.seed is not None:
                noise[i].exponential_(generator=self._row_generator(r, offset, salt))
        return noise

    def uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        """One U(0, 1) draw per row (speculative acceptance), seeded like ``exponential_noise`` but apart from it."""
        u = torch.rand(len(rows), device=self.device, generator=self.generator)
        for i, r in enumerate(rows):
            if r.params.seed is not None:
                u[i] = torch.rand(1, device=self.device, generator=self._row_generator(r, 0, 0x5BD1E995))[0]
        return u

    def probs(self, logits: torch.Tensor, rows: list[SamplingRow], normalise: bool = True) -> torch.Tensor:
        """The distribution each row samples from: temperature, then top-k, top-p and min-p (float32)."""
        logits = logits.float()
        batch, vocab = logits.shape
        temps = torch.tensor([max(r.params.temperature, 1e-5) for r in rows], device=self.device)
        logits = logits / temps[:, None]

        top_k = [r.params.top_k if r.params.top_k > 0 else vocab for r in rows]
        if min(top_k) < vocab:
            k = torch.tensor([min(t, vocab) for t in top_k], device=self.device)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th all stay

        probs = torch.softmax(logits, dim=-1)
        # Decided from the parameters on the host: a tensor comparison would make the GPU sync here.
        if any(r.params.top_p < 1.0 for r in rows):
            top_p = torch.tensor([r.params.top_p for r in rows], device=self.device)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_p.cumsum(dim=-1) - sorted_p
            drop_sorted = mass_before >= top_p[:, None]
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if any(r.params.min_p > 0 for r in rows):
            min_p = torch.tensor([r.params.min_p for r in rows], device=self.device)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs / probs.sum(dim=-1, keepdim=True) if normalise else probs
