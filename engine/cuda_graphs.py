"""CUDA graphs of the decode step over a ladder of batch sizes.

A decode step of GPT-2 XL launches ~500 small kernels; on the H100 launching them costs more than running
them at small batch. A graph replays the whole step as one launch. Each bucket's graph is captured once with
static input buffers that every step fills in place; a batch is padded up to the next bucket (padding tokens
have slot -1, so they write nothing, and a context of 1). Graphs are captured largest first into one memory
pool, so smaller ones reuse the largest one's activation memory.

Decode steps whose sequences share a prefix run cascade attention (docs/shared-prefix-attention.md) and have
graphs of their own, on a coarser ladder. Their grouping changes from step to step, so their attention metadata
sits in static buffers of fixed capacity (``CascadeBuffers``) and the kernels read all of it from there.

With LoRA enabled there are two sets of decode (and cascade) graphs: the ordinary ones, replayed by steps in which
no row has an adapter, and LoRA ones, which read each row's slot from a static buffer and run the LoRA kernels in
the layers that some loaded adapter targets. Those layers are fixed at capture, so the runner recaptures the LoRA set
when an adapter targeting new layers is loaded (``capture_lora``).

Speculative decoding adds verify steps: each request's last token followed by up to k proposals. Their graphs
(``VerifyBuffers``) give every request the same q = 1 + k query tokens, so that a bucket's launches are fixed;
a request with fewer proposals is padded after its real tokens (``verify_layout``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from gpt2serve.engine.attention import MAX_CASCADE_GROUPS, AttentionMetadata, CascadeMetadata

log = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def cascade_bucket_sizes(max_num_seqs: int, min_rows: int) -> list[int]:
    """Batch sizes of the cascade graphs: doubling from 8 to 128, then 192, then steps of 128, and max_num_seqs.

    Coarser than the ordinary ladder because every graph keeps its own logits ([b, vocab]: 51 MB at 512 rows of
    GPT-2 in fp16) and costs a capture at start-up: 9 graphs up to 512 instead of 33. Padding a step to the next
    size is cheap: padding rows attend to one key and sit in the group with no prefix, so attention does almost
    nothing for them, and up to ~128 rows the linear layers are bound by reading the weights, not by rows; above
    that the steps keep padding under 50 %. Sizes below ``min_rows`` could never hold a shared group.
    """
    if max_num_seqs < min_rows:
        return []
    ladder = [8, 16, 32, 64, 128, 192] + list(range(256, max_num_seqs, 128))
    return [b for b in ladder if min_rows <= b < max_num_seqs] + [max_num_seqs]


# Verify graphs keep logits for all of their b * q rows (at k = 4, 320 rows of GPT-2 in fp16 are 32 MB) and cost a
# capture each, so their ladder stops at this many tokens; larger verify steps run eagerly. Speculation pays at small
# batch, where a step is mostly launch overhead (an eager GPT-2 XL step spends ~8-10 ms launching its kernels, a
# graphed decode step takes ~2.7 ms in all); at k = 4 the cap keeps batches up to 64 (the whole ladder's logits take
# 64 MB), at k = 1 up to 256.
VERIFY_GRAPH_MAX_TOKENS = 512


def verify_bucket_sizes(max_num_seqs: int, query_len: int, max_tokens: int = VERIFY_GRAPH_MAX_TOKENS) -> list[int]:
    """Batch sizes of the verify graphs: doubling from 1 to 64, then steps of 64, and max_num_seqs; only sizes whose
    ``size * query_len`` tokens stay within ``max_tokens``."""
    ladder = [1, 2, 4, 8, 16, 32, 64] + list(range(128, max_num_seqs, 64))
    sizes = [b for b in ladder if b < max_num_seqs and b * query_len <= max_tokens]
    return sizes + ([max_num_seqs] if max_num_seqs * query_len <= max_tokens else [])


@dataclass
class VerifyLayout:
    """Where a verify step's tokens sit in a verify graph: request i owns rows ``i * q .. i * q + q - 1``, its real
    tokens (last token, then its proposals) first and padding after them."""

    token_rows: np.ndarray  # [tokens] int64: the graph row of each real token, in the flat batch's order
    query_start_loc: np.ndarray  # [n + 1] int64: arange(n + 1) * q
    num_rows: int  # n * q

    def pad(self, values: np.ndarray, fill: int) -> np.ndarray:
        """Flat-batch ``values`` (one per real token) spread over the graph's rows, ``fill`` in the padding rows."""
        out = np.full(self.num_rows, fill, dtype=np.asarray(values).dtype)
        out[self.token_rows] = values
        return out


def verify_layout(num_spec: np.ndarray, query_len: int) -> VerifyLayout:
    """The graph layout of a step in which request i verifies ``num_spec[i]`` proposals (0: a plain decode).

    Padding goes after a request's real tokens: causal attention then never shows it to them (each real token sees
    only positions up to its own), so their hidden states, and the logits ``_verify`` reads, are those of the
    unpadded step. Padding tokens get slot -1 (their K/V are not stored); their own rows are garbage, never read.
    """
    num_spec = np.asarray(num_spec, dtype=np.int64)
    assert ((num_spec >= 0) & (num_spec < query_len)).all(), "a request verifies more proposals than q - 1"
    counts = num_spec + 1
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    seq_of = np.repeat(np.arange(len(counts)), counts)
    token_rows = seq_of * query_len + np.arange(starts[-1]) - starts[seq_of]
    return VerifyLayout(token_rows, np.arange(len(counts) + 1, dtype=np.int64) * query_len, len(counts) * query_len)


class VerifyBuffers:
    """Static inputs of the verify graphs, for up to ``max_seqs`` requests of ``q`` tokens each.

    ``query_start_loc`` never changes (every request has q tokens), so with the bucket's token and sequence counts
    the attention kernel's grid is fixed (``T // block_m + B`` query tiles); sequence lengths, slots and block
    tables come from these buffers at replay. A request's length is its computed tokens + q, padding included,
    since the kernel places a request's first query token at ``seq_len - q``. Its padding tokens then sit up to
    q - 1 positions past the model's length and read keys there: the block table has columns for them. Entries past
    what a step copies in are left from earlier steps (or 0), valid block ids. The real tokens' query tile loads
    those positions too and weighs them by exactly 0, which is harmless because every slot of the pool holds a
    finite value (it starts zeroed and only ever receives computed K/V).
    """

    def __init__(self, max_seqs: int, q: int, max_model_len: int, block_size: int, device: torch.device | str):
        self.q = q
        n = max_seqs * q
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        # Padding requests: q tokens over a context of exactly them, as decode graphs pad with a context of 1.
        self.seq_lens = torch.full((max_seqs,), q, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_seqs + 1, dtype=torch.int32, device=device) * q
        self.max_seq_len = max_model_len + q - 1
        width = -(-self.max_seq_len // block_size)
        self.block_tables = torch.zeros((max_seqs, width), dtype=torch.int32, device=device)

    def views(self, b: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids, positions and attention metadata of a bucket of ``b`` requests (what its graph reads)."""
        t = b * self.q
        meta = AttentionMetadata(self.slot_mapping[:t], self.query_start_loc[:b + 1], self.seq_lens[:b],
                                 self.block_tables[:b], self.q, self.max_seq_len)
        return self.input_ids[:t], self.positions[:t], meta

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, b: int) -> None:
        """Copy a step in ``verify_layout`` (n requests, n * q rows) in, padded to ``b`` requests."""
        n, t = meta.seq_lens.shape[0], input_ids.shape[0]
        assert t == n * self.q and n <= b
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.slot_mapping[:t].copy_(meta.slot_mapping)
        self.slot_mapping[t:b * self.q].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:b].fill_(self.q)
        self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables)


class CascadeBuffers:
    """Cascade metadata in device buffers of fixed capacity, for graphs: ``MAX_CASCADE_GROUPS`` shared groups and
    the trailing group of rows that share nothing, for any bucket of up to ``max_rows`` rows.

    ``fill`` copies a step's plan in place. The groups the plan does not use are empty (no rows, prefix 0: their
    one prefix-pass program returns at once). Padding rows join the trailing group with a one-token suffix, as the
    ordinary graphs pad: their slot is -1, so nothing of theirs is stored, and the one key they read is in a block
    id left by an earlier step (or 0), always a valid block of the pool.
    """

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device | str):
        groups = MAX_CASCADE_GROUPS + 1
        i32 = dict(dtype=torch.int32, device=device)
        self.group_query_start = torch.zeros(groups + 1, **i32)
        self.group_rows = torch.arange(max_rows, **i32)
        self.prefix_tables = torch.zeros((groups, max_blocks), **i32)
        self.prefix_lens = torch.zeros(groups, **i32)
        self.suffix_tables = torch.zeros((max_rows, max_blocks), **i32)
        self.suffix_lens = torch.ones(max_rows, **i32)
        self._rows = torch.arange(max_rows, **i32)

    def metadata(self, b: int, splits: tuple[int, int], max_len: int) -> CascadeMetadata:
        """Views for a bucket of ``b`` rows. The host-side maxima are the bucket's bounds, as the ordinary graphs
        pass max_model_len for max_seq_len: they only size the launch (query-tile height) and are the same for
        every step the graph replays."""
        return CascadeMetadata(
            group_query_start=self.group_query_start, group_rows=self.group_rows[:b],
            prefix_tables=self.prefix_tables, prefix_lens=self.prefix_lens,
            suffix_tables=self.suffix_tables[:b], suffix_lens=self.suffix_lens[:b],
            max_group_size=b, max_prefix_len=max_len, max_suffix_len=max_len,
            num_shared_groups=MAX_CASCADE_GROUPS, prefix_splits=splits[0], num_splits=splits[1],
        )

    def clear(self, b: int) -> None:
        """Nothing shared: all ``b`` rows in group 0, with no prefix (what graphs are captured with)."""
        self.group_query_start[:1].zero_()
        self.group_query_start[1:].fill_(b)
        self.group_rows[:b].copy_(self._rows[:b])
        self.prefix_lens.zero_()
        self.suffix_lens[:b].fill_(1)

    def fill(self, plan: CascadeMetadata, b: int) -> None:
        """Copy ``plan`` (device tensors, ``n <= b`` rows) in, padded to ``b`` rows."""
        n, k = plan.group_rows.shape[0], plan.num_shared_groups
        assert n <= b <= self.group_rows.shape[0] and k <= MAX_CASCADE_GROUPS
        # Group k is the plan's trailing group if it has one (plan.group_query_start[k] is where it starts; n if it
        # has none), and it takes the padding rows n..b as well; groups past it end where they start, at b.
        self.group_query_start[:k + 1].copy_(plan.group_query_start[:k + 1])
        self.group_query_start[k + 1:].fill_(b)
        self.group_rows[:n].copy_(plan.group_rows)
        self.group_rows[n:b].copy_(self._rows[n:b])
        self.prefix_lens[:k].copy_(plan.prefix_lens[:k])
        self.prefix_lens[k:].zero_()
        self.prefix_tables[:k, :plan.prefix_tables.shape[1]].copy_(plan.prefix_tables[:k])
        self.suffix_tables[:n, :plan.suffix_tables.shape[1]].copy_(plan.suffix_tables)
        self.suffix_lens[:n].copy_(plan.suffix_lens)
        self.suffix_lens[n:b].fill_(1)


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_num_seqs: int, max_blocks_per_seq: int,
                 max_model_len: int, device: torch.device, cascade_min_rows: int | None = None,
                 verify_query_len: int | None = None, lora: bool = False):
        """``cascade_min_rows``: also capture cascade graphs, for steps of at least this many rows.
        ``verify_query_len``: also capture verify graphs, for speculative steps of this many tokens per request.
        ``lora``: steps may carry LoRA slots; their decode and cascade graphs are a second set, captured by
        ``capture_lora`` once some adapter targets a layer."""
        self.sizes = bucket_sizes(max_num_seqs)
        self.cascade_sizes = cascade_bucket_sizes(max_num_seqs, cascade_min_rows) if cascade_min_rows else []
        self.verify_sizes = (verify_bucket_sizes(max_num_seqs, verify_query_len, VERIFY_GRAPH_MAX_TOKENS)
                             if verify_query_len else [])
        self._model, self._kv_caches, self._max_model_len, self._device = model, kv_caches, max_model_len, device
        self._verify_query_len = verify_query_len
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        # Read by the LoRA graphs only; rows without an adapter (and padding) have slot -1.
        self.lora_slots = torch.full((n,), -1, dtype=torch.int32, device=device) if lora else None
        self.cascade = CascadeBuffers(n, max_blocks_per_seq, device) if self.cascade_sizes else None
        self.verify = None
        if self.verify_sizes:
            self.verify = VerifyBuffers(self.verify_sizes[-1], verify_query_len, max_model_len,
                                        kv_caches[0].shape[2], device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_logits: dict[int, torch.Tensor] = {}
        self.verify_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.verify_logits: dict[int, torch.Tensor] = {}
        # Steps without an adapter row replay the graphs above, which run no LoRA kernel at all (the fused decode
        # linears keep their LayerNorm and GELU); steps with one replay these, which apply LoRA in the layers some
        # adapter targets (``Linear.lora_targeted`` when they were captured).
        self.lora_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_logits: dict[int, torch.Tensor] = {}
        self.lora_cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_cascade_logits: dict[int, torch.Tensor] = {}
        self._pool = None
        if torch.device(device).type == "cuda":
            from gpt2serve.kernels.decode_linear import reserve_scratch

            reserve_scratch(device)
        seconds = self._capture_set(("decode", "cascade", "verify"), lora=False)
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), n, seconds["decode"])
        if self.cascade_sizes:
            log.info("captured %d cascade-attention decode graphs (batch %s; up to %d shared groups) in %.1f s",
                     len(self.cascade_sizes), ", ".join(map(str, self.cascade_sizes)), MAX_CASCADE_GROUPS,
                     seconds["cascade"])
        if self.verify_sizes:
            logit_bytes = sum(t.numel() * t.element_size() for t in self.verify_logits.values())
            log.info("captured %d speculative verify graphs (batch %s, %d tokens each) in %.1f s; their logits "
                     "take %.0f MB", len(self.verify_sizes), ", ".join(map(str, self.verify_sizes)),
                     verify_query_len, seconds["verify"], logit_bytes / 2**20)

    def capture_lora(self) -> None:
        """(Re)capture the LoRA decode and cascade graphs for the layers adapters target now. Between steps
        only: the static buffers are reset first, so the capture's warm-up run writes no KV slot."""
        assert self.lora_slots is not None, "DecodeGraphs built without lora"
        for store in (self.lora_graphs, self.lora_logits, self.lora_cascade_graphs, self.lora_cascade_logits):
            store.clear()  # the old graphs' memory goes back to the pool before the new ones are captured
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self.lora_slots.fill_(-1)
        seconds = self._capture_set(("decode", "cascade"), lora=True)
        log.info("captured %d LoRA decode CUDA graphs%s in %.1f s", len(self.lora_graphs),
                 f" and {len(self.lora_cascade_graphs)} cascade ones" if self.cascade_sizes else "",
                 seconds["decode"] + seconds["cascade"])

    def _capture_set(self, kinds: tuple[str, ...], lora: bool) -> dict[str, float]:
        """Capture every bucket of ``kinds`` (with the LoRA slots buffer in their metadata if ``lora``); returns the
        seconds each kind took."""
        model, kv_caches, max_model_len, device = self._model, self._kv_caches, self._max_model_len, self._device
        q = self._verify_query_len
        if lora:
            store = {"decode": (self.lora_graphs, self.lora_logits),
                     "cascade": (self.lora_cascade_graphs, self.lora_cascade_logits)}
        else:
            store = {"decode": (self.graphs, self.logits), "cascade": (self.cascade_graphs, self.cascade_logits),
                     "verify": (self.verify_graphs, self.verify_logits)}
        sizes = {"decode": self.sizes, "cascade": self.cascade_sizes, "verify": self.verify_sizes}
        seconds = dict.fromkeys(kinds, 0.0)
        # Largest first (by tokens), all kinds in one pool: a cascade graph of b rows needs a little more than an
        # ordinary one (the fp32 partials), a verify graph of b requests holds b * q tokens.
        rank = {"decode": 0, "cascade": 1, "verify": 2}
        captures = [(b, kind) for kind in kinds for b in sizes[kind]]
        captures.sort(key=lambda c: (c[0] * (q if c[1] == "verify" else 1), rank[c[1]]), reverse=True)
        with torch.inference_mode():
            for b, kind in captures:
                start = time.perf_counter()
                ids, positions = self.input_ids[:b], self.positions[:b]
                if kind == "verify":
                    ids, positions, meta = self.verify.views(b)
                else:
                    # max_seq_len is the upper bound: kernels read each sequence's true length from seq_lens.
                    meta = AttentionMetadata(self.slot_mapping[:b], self.query_start_loc[:b + 1], self.seq_lens[:b],
                                             self.block_tables[:b], 1, max_model_len,
                                             lora_slots=self.lora_slots[:b] if lora else None)
                if kind == "cascade":
                    from gpt2serve.kernels.cascade_attention import bucket_splits

                    self.cascade.clear(b)
                    splits = bucket_splits(b, model.num_heads, max_model_len, kv_caches[0].dtype, device)
                    meta.cascade = self.cascade.metadata(b, splits, max_model_len)

                def forward(ids=ids, positions=positions, meta=meta):
                    return model.compute_logits(model(ids, positions, kv_caches, meta))

                graphs, outputs = store[kind]
                graphs[b], outputs[b] = self._capture(forward, device)
                seconds[kind] += time.perf_counter() - start
        return seconds

    def _capture(self, forward, device: torch.device):
        """Run ``forward`` once on a side stream (Triton compiles there, outside the capture), then capture it into
        the shared pool; returns the graph and its output. (CPU tests replace this with an eager stand-in to drive
        the static buffers through the interpreter.)"""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward()
        torch.cuda.synchronize(device)
        return graph, logits

    def fits(self, num_seqs: int, cascade: bool = False, lora: bool = False) -> bool:
        sizes = self.cascade_sizes if cascade else self.sizes
        if lora and not self.lora_graphs:  # no LoRA set captured (yet): the step runs eagerly
            return False
        return bool(sizes) and num_seqs <= sizes[-1]

    def fits_verify(self, num_seqs: int) -> bool:
        return bool(self.verify_sizes) and num_seqs <= self.verify_sizes[-1]

    def run_verify(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the verify graph of the smallest bucket that holds the step, given in ``verify_layout`` (n
        requests of q rows each); returns the logits of its n * q rows."""
        n = meta.seq_lens.shape[0]
        b = next(s for s in self.verify_sizes if s >= n)
        self.verify.fill(input_ids, positions, meta, b)
        self.verify_graphs[b].replay()
        return self.verify_logits[b][:input_ids.shape[0]]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph of the smallest bucket that holds the step: a cascade graph when ``meta.cascade``."""
        n = input_ids.shape[0]
        plan = meta.cascade
        b = next(s for s in (self.sizes if plan is None else self.cascade_sizes) if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        lora = meta.lora_slots is not None
        if lora:
            self.lora_slots[:n].copy_(meta.lora_slots)
            self.lora_slots[n:b].fill_(-1)
        if plan is None:
            self.seq_lens[:n].copy_(meta.seq_lens)
            self.seq_lens[n:b].fill_(1)
            self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables)
            graph, logits = (self.lora_graphs[b], self.lora_logits[b]) if lora else (self.graphs[b], self.logits[b])
        else:
            # Cascade attention reads only its own metadata (suffix tables and lengths replace these).
            self.cascade.fill(plan, b)
            graph, logits = ((self.lora_cascade_graphs[b], self.lora_cascade_logits[b]) if lora
                             else (self.cascade_graphs[b], self.cascade_logits[b]))
        graph.replay()
        return logits[:n]
