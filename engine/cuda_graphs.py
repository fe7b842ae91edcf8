"""CUDA graphs of the decode step over a ladder of batch sizes.

A decode step of GPT-2 XL launches ~500 small kernels; on the H100 launching them costs more than running
them at small batch. A graph replays the whole step as one launch. Each bucket's graph is captured once with
static input buffers that every step fills in place; a batch is padded up to the next bucket (padding tokens
have slot -1, so they write nothing, and a context of 1). Graphs are captured largest first into one memory
pool, so smaller ones reuse the largest one's activation memory.

Decode steps whose sequences share a prefix run cascade attention (docs/shared-prefix-attention.md) and have
graphs of their own, on a coarser ladder. Their grouping changes from step to step, so their attention metadata
sits in static buffers of fixed capacity (``CascadeBuffers``) and the kernels read all of it from there.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.attention import MAX_CASCADE_GROUPS, AttentionMetadata, CascadeMetadata

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
                 max_model_len: int, device: torch.device, cascade_min_rows: int | None = None):
        """``cascade_min_rows``: also capture cascade graphs, for steps of at least this many rows."""
        self.sizes = bucket_sizes(max_num_seqs)
        self.cascade_sizes = cascade_bucket_sizes(max_num_seqs, cascade_min_rows) if cascade_min_rows else []
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.cascade = CascadeBuffers(n, max_blocks_per_seq, device) if self.cascade_sizes else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_logits: dict[int, torch.Tensor] = {}
        seconds = {False: 0.0, True: 0.0}
        self._pool = None
        # Largest first, both kinds in one pool: a cascade graph of b rows needs a little more (the fp32 partials).
        captures = sorted([(b, False) for b in self.sizes] + [(b, True) for b in self.cascade_sizes], reverse=True)
        with torch.inference_mode():
            for b, cascade in captures:
                start = time.perf_counter()
                # max_seq_len is the upper bound: kernels read each sequence's true length from seq_lens.
                meta = AttentionMetadata(self.slot_mapping[:b], self.query_start_loc[:b + 1], self.seq_lens[:b],
                                         self.block_tables[:b], 1, max_model_len)
                if cascade:
                    from kernels.cascade_attention import bucket_splits

                    self.cascade.clear(b)
                    splits = bucket_splits(b, model.num_heads, max_model_len, kv_caches[0].dtype, device)
                    meta.cascade = self.cascade.metadata(b, splits, max_model_len)

                def forward(b=b, meta=meta):
                    return model.compute_logits(model(self.input_ids[:b], self.positions[:b], kv_caches, meta))

                graph, logits = self._capture(forward, device)
                (self.cascade_graphs if cascade else self.graphs)[b] = graph
                (self.cascade_logits if cascade else self.logits)[b] = logits
                seconds[cascade] += time.perf_counter() - start
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), n, seconds[False])
        if self.cascade_sizes:
            log.info("captured %d cascade-attention decode graphs (batch %s; up to %d shared groups) in %.1f s",
                     len(self.cascade_sizes), ", ".join(map(str, self.cascade_sizes)), MAX_CASCADE_GROUPS,
                     seconds[True])

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

    def fits(self, num_seqs: int, cascade: bool = False) -> bool:
        sizes = self.cascade_sizes if cascade else self.sizes
        return bool(sizes) and num_seqs <= sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph of the smallest bucket that holds the step: a cascade graph when ``meta.cascade``."""
        n = input_ids.shape[0]
        plan = meta.cascade
        b = next(s for s in (self.sizes if plan is None else self.cascade_sizes) if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        if plan is None:
            self.seq_lens[:n].copy_(meta.seq_lens)
            self.seq_lens[n:b].fill_(1)
            self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables)
            graph, logits = self.graphs[b], self.logits[b]
        else:
            # Cascade attention reads only its own metadata (suffix tables and lengths replace these).
            self.cascade.fill(plan, b)
            graph, logits = self.cascade_graphs[b], self.cascade_logits[b]
        graph.replay()
        return logits[:n]
