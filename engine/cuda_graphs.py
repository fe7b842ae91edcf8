"""CUDA graphs of the decode step over a ladder of batch sizes.

A decode step of GPT-2 XL launches ~500 small kernels; on the H100 launching them costs more than running
them at small batch. A graph replays the whole step as one launch. Each bucket's graph is captured once with
static input buffers that every step fills in place; a batch is padded up to the next bucket (padding tokens
have slot -1, so they write nothing, and a context of 1). Graphs are captured largest first into one memory
pool, so smaller ones reuse the largest one's activation memory.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.attention import AttentionMetadata

log = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_num_seqs: int, max_blocks_per_seq: int,
                 max_model_len: int, device: torch.device):
        start = time.perf_counter()
        self.sizes = bucket_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in reversed(self.sizes):
                # max_seq_len is the upper bound: kernels read each sequence's true length from seq_lens.
                meta = AttentionMetadata(self.slot_mapping[:b], self.query_start_loc[:b + 1], self.seq_lens[:b],
                                         self.block_tables[:b], 1, max_model_len)
                forward = lambda: model.compute_logits(model(self.input_ids[:b], self.positions[:b], kv_caches, meta))  # noqa: E731
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    forward()  # compile and autotune outside the capture
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[b] = forward()
                self.graphs[b] = graph
        torch.cuda.synchronize(device)
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), n,
                 time.perf_counter() - start)

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        b = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:b].fill_(1)
        self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[b].replay()
        return self.logits[b][:n]
