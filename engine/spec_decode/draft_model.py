"""Draft-model proposals: a small GPT-2 with the target's vocabulary (gpt2 for gpt2-xl) guesses the next k tokens.

The draft runs in the model runner beside the target, on a paged KV pool of its own (``draft_kv_cache_gib``) with
its own block bookkeeping, and remembers for each request which tokens its pool holds K/V for. A ``propose`` call
first lets every request catch up: of the tokens it holds, the common prefix with the request's tokens stays (the
proposals the target rejected fall out of it, and a preempted request that comes back is no special case) and
the rest is fed again. Since the draft's own proposals already have their K/V, a decoding request catches up by
one token (the target's correction) or two (the last proposal and the bonus token, when all were accepted).
Then one pass per proposed token feeds each request one token and draws the next.

On a GPU those passes replay the draft's decode CUDA graphs (``engine/cuda_graphs.py``). Catch-ups of up to
``GRAPH_CATCH_UP`` extra tokens run as graph passes too, right-aligned so that every request draws its first
proposal in the same pass (a request with less to catch up writes nothing in the passes before its turn); longer
ones (a new request's prompt) run first, as eager variable-length passes like the target's prefill.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from gpt2serve.engine.attention import AttentionMetadata
from gpt2serve.engine.cuda_graphs import DecodeGraphs
from gpt2serve.engine.kv_manager import BlockPool, cdiv
from gpt2serve.engine.loader import load_hf_config, load_model
from gpt2serve.engine.model_runner import HostStaging
from gpt2serve.engine.sampling_params import SamplingParams
from gpt2serve.engine.spec_decode.draft_sampling import DraftSampling
from gpt2serve.engine.spec_decode.proposer import PROPOSERS, Proposal, ProposalRequest, Proposer

log = logging.getLogger(__name__)

# Extra catch-up tokens still fed through graph passes (one token per request each) rather than an eager pass. A
# graph pass is one launch; an eager pass launches a dozen kernels a layer from Python, which at small batch costs
# the draft several graph passes' time. Steady-state catch-ups need at most one extra token (two after a full
# acceptance); a starting point, to be tuned on the GPU.
GRAPH_CATCH_UP = 2


@dataclass
class _DraftSeq:
    row: int  # its row of the draft's block table
    blocks: list[int]
    tokens: list[int]  # the tokens whose K/V the draft's pool holds, in order
    num_confirmed: int = 0  # of those, how many the target had emitted at the last call (the rest are proposals)


@dataclass
class _Job:
    """One request's share of a propose call."""

    req: ProposalRequest
    seq: _DraftSeq
    start: int  # the first token to feed: the pool holds K/V for the ones before it
    num: int  # tokens to propose


@PROPOSERS.register("draft_model")
class DraftModelProposer(Proposer):
    def __init__(self, config, device: torch.device, dtype: torch.dtype, backend, num_blocks: int | None = None):
        """``num_blocks`` fixes the pool's size (tests); by default it is ``draft_kv_cache_gib``'s worth."""
        spec = config.speculative
        if spec is None or not spec.draft_model:
            raise ValueError("speculative method draft_model needs speculative.draft_model (e.g. gpt2 for gpt2-xl)")
        draft_config = config.model_copy(update=dict(
            model=spec.draft_model, load_format=spec.draft_load_format, tokenizer=None, speculative=None))
        self.model, self.hf_config = load_model(draft_config, backend, device, dtype)
        target = load_hf_config(config)
        if self.model.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft model {spec.draft_model!r} has a vocabulary of {self.model.vocab_size} tokens, the target "
                f"{config.model!r} one of {target.vocab_size}: a draft must share the target's tokenizer")
        self.device, self.k = device, spec.num_speculative_tokens
        self.block_size = bs = config.block_size
        target_len = min(config.max_model_len or target.n_positions, target.n_positions)
        self.max_model_len = min(target_len, self.hf_config.n_positions)
        self.max_blocks_per_seq = cdiv(self.max_model_len, bs)
        self.token_budget = config.max_num_batched_tokens

        m = self.model
        bytes_per_block = 2 * m.num_layers * bs * m.num_heads * m.head_dim * dtype.itemsize
        self.num_blocks = num_blocks or max(int(spec.draft_kv_cache_gib * 2**30 // bytes_per_block), 1)
        self.kv_cache = torch.zeros((m.num_layers, 2, self.num_blocks, bs, m.num_heads, m.head_dim),
                                    device=device, dtype=dtype)
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.pool = BlockPool(self.num_blocks)  # no prefix caching: blocks are plain, freed on drop
        self.block_table = np.zeros((config.max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        self.seqs: dict[str, _DraftSeq] = {}
        self._staging = HostStaging(device, pin=device.type == "cuda")
        self._query_start = torch.arange(config.max_num_seqs + 1, dtype=torch.int32, device=device)
        self.sampling = DraftSampling(device, config.seed)
        self.counters = {"proposals": 0, "proposed_tokens": 0, "no_room": 0}
        log.info("draft model %s: %d layers, hidden %d; KV pool %d blocks of %d tokens (%.2f GiB)",
                 spec.draft_model, m.num_layers, m.num_heads * m.head_dim, self.num_blocks, bs,
                 self.num_blocks * bytes_per_block / 2**30)

        self.graphs = None
        if device.type == "cuda" and not config.enforce_eager and backend.name != "torch":
            self.graphs = DecodeGraphs(m, self.kv_caches, config.max_num_seqs, self.max_blocks_per_seq,
                                       self.max_model_len, device)
        if device.type == "cuda":
            self._warm_up(config.max_num_seqs)

    # ------------------------------------------------------------------ the interface
    @torch.inference_mode()
    def propose(self, batch: list[ProposalRequest]) -> dict[str, Proposal]:
        jobs = [job for r in batch if (job := self._plan(r)) is not None]
        if not jobs:
            return {}
        # Longest proposals first: the requests still drawing in a later pass are then a prefix of the batch.
        jobs.sort(key=lambda job: -job.num)
        self._staging.begin()
        extra = max(len(job.req.token_ids) - 1 - job.start for job in jobs)
        lead = extra if self.graphs is not None and extra <= GRAPH_CATCH_UP else 0
        if extra > lead:
            self._prefill(jobs)
        tokens, probs = self._passes(jobs, lead)
        self._staging.end()

        proposals = {}
        for i, (job, row) in enumerate(zip(jobs, tokens.tolist())):
            ids = row[:job.num]
            job.seq.tokens += ids[:-1]  # the last proposal is drawn, never fed
            proposals[job.req.req_id] = Proposal(ids, probs[i][:job.num] if i in probs else None)
        self.counters["proposals"] += len(jobs)
        self.counters["proposed_tokens"] += sum(job.num for job in jobs)
        return proposals

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            seq = self.seqs.pop(req_id, None)
            if seq is not None:
                self.pool.release(seq.blocks)
                self._free_rows.append(seq.row)

    def stats(self) -> dict[str, float | int]:
        free = self.pool.num_free
        return {"draft_proposals": self.counters["proposals"],
                "draft_proposed_tokens": self.counters["proposed_tokens"],
                "draft_no_room": self.counters["no_room"],  # requests given nothing: no block or table row left
                "draft_kv_usage": 1.0 - free / self.num_blocks, "draft_num_free_blocks": free,
                "draft_num_total_blocks": self.num_blocks, "draft_num_requests": len(self.seqs)}

    # ------------------------------------------------------------------ bookkeeping
    def _plan(self, r: ProposalRequest) -> _Job | None:
        """Rows and blocks for ``r``, or None (it gets no proposal) when none are left or its context is full."""
        ids = r.token_ids
        # The pool needs K/V for the context and for every proposal but the last: positions up to len + num - 2.
        num = min(r.num_tokens, self.max_model_len - len(ids) + 1)
        if num < 1 or not ids:
            return None
        seq = self.seqs.get(r.req_id)
        if seq is None:
            if not self._free_rows:
                self.counters["no_room"] += 1
                return None
            seq = self.seqs[r.req_id] = _DraftSeq(self._free_rows.pop(), [], [])
        start = min(self._valid_prefix(seq, ids), len(ids) - 1)  # the last token is always fed: its logits
        # A short pool shortens the proposal, or skips the request; it never fails the step.
        num = min(num, (len(seq.blocks) + self.pool.num_free) * self.block_size - len(ids) + 1)
        if num < 1:
            self.counters["no_room"] += 1
            return None
        need = cdiv(len(ids) + num - 1, self.block_size)
        if need > len(seq.blocks):
            seq.blocks += self.pool.allocate(need - len(seq.blocks))
        elif need < len(seq.blocks):  # a shorter proposal than last time (near max_tokens)
            self.pool.release(seq.blocks[need:])
            del seq.blocks[need:]
        self.block_table[seq.row, :need] = seq.blocks
        del seq.tokens[start:]
        seq.tokens += ids[start:]
        seq.num_confirmed = len(ids)
        return _Job(r, seq, start, num)

    @staticmethod
    def _valid_prefix(seq: _DraftSeq, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` the pool holds: the common prefix of ``seq.tokens`` and ``ids``.

        The tokens the target had emitted at the last call never change while a request lives (a preempted one
        keeps them, or was dropped), so only the last of them is checked and the proposals after it compared: a
        full comparison would cost microseconds per request per step. If that one token differs, the whole lists
        are compared.
        """
        held = seq.tokens
        limit = min(len(held), len(ids))
        i = min(seq.num_confirmed, limit)
        if i and held[i - 1] != ids[i - 1]:
            i = 0
        while i < limit and held[i] == ids[i]:
            i += 1
        return i

    def _slots(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        bs = self.block_size
        return self.block_table[rows, positions // bs].astype(np.int64) * bs + positions % bs

    # ------------------------------------------------------------------ the passes
    def _prefill(self, jobs: list[_Job]) -> None:
        """Feed each request's catch-up tokens but the last, in eager variable-length passes of at most
        ``max_num_batched_tokens`` tokens (a long catch-up is split over passes, as chunked prefill does), so that
        the draft's activations stay within what the target's memory profile measured."""
        passes, pieces, used = [], [], 0
        for job in jobs:
            s, end = job.start, len(job.req.token_ids) - 1
            while s < end:
                take = min(end - s, self.token_budget - used)
                pieces.append((job, s, s + take))
                s, used = s + take, used + take
                if used == self.token_budget:
                    passes.append(pieces)
                    pieces, used = [], 0
        if pieces:
            passes.append(pieces)
        to_dev = self._staging.to_device
        for n, pieces in enumerate(passes):  # one set of staging buffers per pass: copies may still be in flight
            starts = np.array([s for _, s, _ in pieces], dtype=np.int64)
            ends = np.array([e for _, _, e in pieces], dtype=np.int64)
            counts = ends - starts
            query_start = np.zeros(len(pieces) + 1, dtype=np.int64)
            np.cumsum(counts, out=query_start[1:])
            seq_of = np.repeat(np.arange(len(pieces)), counts)
            positions = starts[seq_of] + np.arange(query_start[-1]) - query_start[seq_of]
            rows = np.array([job.seq.row for job, _, _ in pieces], dtype=np.int64)
            ids = np.fromiter((t for job, s, e in pieces for t in job.req.token_ids[s:e]), dtype=np.int64,
                              count=int(query_start[-1]))
            meta = AttentionMetadata(
                slot_mapping=to_dev(self._slots(rows[seq_of], positions), torch.int64, f"prefill{n}_slots"),
                query_start_loc=to_dev(query_start, torch.int32, f"prefill{n}_starts"),
                seq_lens=to_dev(ends, torch.int32, f"prefill{n}_seq_lens"),
                block_tables=to_dev(self.block_table[rows, :cdiv(int(ends.max()), self.block_size)], torch.int32,
                                    f"prefill{n}_tables"),
                max_query_len=int(counts.max()), max_seq_len=int(ends.max()),
            )
            self.model(to_dev(ids, torch.int64, f"prefill{n}_ids"), to_dev(positions, torch.int64,
                       f"prefill{n}_positions"), self.kv_caches, meta)  # K/V only: no logits wanted

    def _passes(self, jobs: list[_Job], lead: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``lead`` passes that finish the catch-ups, then one per proposal: pass ``t`` feeds request i the token at
        position ``len_i - 1 - lead + t`` when its K/V are missing and it is not the last proposal (drawn, never
        fed), and passes ``t >= lead`` draw proposal ``t - lead``. Returns the proposals [B, max num] on the device
        and the distributions [num, vocab] of the sampled rows, by row."""
        bs, batch = self.block_size, len(jobs)
        nums = np.array([job.num for job in jobs], dtype=np.int64)
        lens = np.array([len(job.req.token_ids) for job in jobs], dtype=np.int64)
        starts = np.array([job.start for job in jobs], dtype=np.int64)
        rows = np.array([job.seq.row for job in jobs], dtype=np.int64)
        num_passes = lead + int(nums[0])
        positions = lens[None, :] - 1 - lead + np.arange(num_passes)[:, None]  # [passes, B]
        active = (positions >= starts) & (positions <= lens + nums - 2)
        # A row with nothing to feed in a pass writes no K/V (slot -1) and attends to one key, like graph padding.
        positions = np.where(active, positions, 0)
        slots = np.where(active, self._slots(rows[None, :], positions), -1)
        seq_lens = np.where(active, positions + 1, 1)
        # The tokens fed before the first draw: each request's last lead + 1, right-aligned like the passes.
        w = lead + 1
        context_ids = np.array([([0] * w + job.req.token_ids[-w:])[-w:] for job in jobs], dtype=np.int64).T
        context_ids = np.where(active[:w], context_ids, 0)
        to_dev = self._staging.to_device
        positions_d = to_dev(positions, torch.int64, "positions")
        slots_d = to_dev(slots, torch.int64, "slots")
        seq_lens_d = to_dev(seq_lens, torch.int32, "seq_lens")
        context_d = to_dev(context_ids, torch.int64, "ids")
        tables = to_dev(self.block_table[rows, :cdiv(int((lens + nums - 1).max()), bs)], torch.int32, "tables")

        draws = self.sampling.plan([job.req for job in jobs], nums, self.model.vocab_size)
        tokens = torch.zeros((batch, int(nums[0])), dtype=torch.long, device=self.device)
        for t in range(num_passes):
            d = t - lead  # the proposal this pass draws (none while d < 0)
            n = batch if d < 0 else int((nums > d).sum())
            ids = context_d[t, :n] if d <= 0 else tokens[:n, d - 1]
            meta = AttentionMetadata(slots_d[t, :n], self._query_start[:n + 1], seq_lens_d[t, :n], tables[:n], 1,
                                     int(seq_lens[t, :n].max()))
            if self.graphs is not None:
                logits = self.graphs.run(ids, positions_d[t, :n], meta)
            else:
                logits = self.model.compute_logits(self.model(ids, positions_d[t, :n], self.kv_caches, meta))
            if d >= 0:
                tokens[:n, d] = self.sampling.draw(logits, draws, d)
        return tokens, draws.probs_by_row() if draws is not None else {}

    def _warm_up(self, max_num_seqs: int) -> None:
        """Compile the Triton kernels' variants for the draft's shapes before the first request (as the runner does
        for the target's): prompts of a few lengths and batch sizes, each then extended by 1, 2, 3 and 5 tokens
        that the draft did not propose (catch-ups through graph passes, then eager ones beside a context)."""
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        vocab = self.model.vocab_size
        params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=0), SamplingParams(temperature=0)]
        for length in (9, 20, 48, 100):
            for batch in sorted({min(b, max_num_seqs) for b in (1, 2, 16, 17)}):
                if length + 11 + self.k > self.max_model_len:
                    continue
                reqs = [ProposalRequest(f"warm-up-{i}", rng.integers(0, vocab, length).tolist(), length, self.k,
                                        params[min(i, 1)]) for i in range(batch)]
                for extra in (0, 1, 2, 3, 5):
                    for r in reqs:
                        r.token_ids += rng.integers(0, vocab, extra).tolist()
                    self.propose(reqs)
                self.drop([r.req_id for r in reqs])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.counters = dict.fromkeys(self.counters, 0)
        log.info("draft warm-up: %.1f s", time.perf_counter() - start)
