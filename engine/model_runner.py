"""The model runner: owns the weights and the KV pool tensors, turns a SchedulerOutput into one forward pass.

It keeps its own per-request state (token ids, block table), so that the scheduler only sends what changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, get_attention_backend
from engine.config import EngineConfig
from engine.loader import load_model, resolve_device, resolve_dtype
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from engine.sampler import Sampler, SamplingRow, token_logprobs
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class RunnerRequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    sample_index: int
    num_computed_tokens: int = 0


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.model, self.hf_config = load_model(config, self.backend, self.device, self.dtype)
        self.block_size = config.block_size
        self.max_model_len = min(config.max_model_len or self.hf_config.n_positions, self.hf_config.n_positions)
        m = self.model
        self.bytes_per_block = 2 * m.num_layers * self.block_size * m.num_heads * m.head_dim * self.dtype.itemsize
        self.num_blocks = config.num_gpu_blocks or self._profile_num_blocks()
        self.kv_cache = torch.zeros(
            (m.num_layers, 2, self.num_blocks, self.block_size, m.num_heads, m.head_dim),
            device=self.device, dtype=self.dtype,
        )
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.num_cpu_blocks = int(config.swap_space_gib * 2**30 // self.bytes_per_block)
        self._cpu_cache: torch.Tensor | None = None  # swap space, allocated on first swap-out
        self.sampler = Sampler(self.device, config.seed)
        self.requests: dict[str, RunnerRequestState] = {}
        log.info(
            "KV pool: %d blocks of %d tokens = %d tokens (%.2f GiB, %s on %s); swap space %d blocks",
            self.num_blocks, self.block_size, self.num_blocks * self.block_size,
            self.num_blocks * self.bytes_per_block / 2**30, self.dtype, self.device, self.num_cpu_blocks,
        )

    # ------------------------------------------------------------------ memory
    def _profile_num_blocks(self) -> int:
        """On a GPU: what is left of ``gpu_memory_utilization`` after the weights and a worst-case step."""
        if self.device.type != "cuda":
            return max(int(self.config.cpu_kv_cache_gib * 2**30 // self.bytes_per_block), 1)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        self._profile_run()
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        available = total * self.config.gpu_memory_utilization - peak - max(non_torch, 0)
        num_blocks = int(available // self.bytes_per_block)
        log.info(
            "memory profile: total %.1f GiB x %.2f; weights %.2f GiB, activation peak %.2f GiB, non-torch %.2f GiB "
            "-> %.2f GiB for the KV pool", total / 2**30, self.config.gpu_memory_utilization, weights / 2**30,
            (peak - weights) / 2**30, non_torch / 2**30, available / 2**30,
        )
        if num_blocks < 1:
            raise RuntimeError("no GPU memory left for the KV pool; raise gpu_memory_utilization or shrink batches")
        return num_blocks

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One step of max_num_batched_tokens prompt tokens and max_num_seqs sampled rows, on a scratch pool."""
        m = self.model
        tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        seq_len = min(tokens, self.max_model_len)
        num_seqs = -(-tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        scratch = torch.zeros((m.num_layers, 2, num_seqs * blocks_per_seq, self.block_size, m.num_heads, m.head_dim),
                              device=self.device, dtype=self.dtype)
        lens = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(self.device, torch.int32)
        tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=self.device).view(num_seqs, -1)
        slots = (tables.long()[:, :, None] * self.block_size + torch.arange(self.block_size, device=self.device))
        slot_mapping = torch.cat([slots[i].flatten()[:n] for i, n in enumerate(lens)])
        meta = AttentionMetadata(slot_mapping, starts, torch.tensor(lens, dtype=torch.int32, device=self.device),
                                 tables, max(lens), max(lens))
        ids = torch.randint(0, m.vocab_size, (tokens,), device=self.device)
        hidden = m(ids, positions, list(scratch.unbind(0)), meta)
        rows = hidden[torch.arange(min(self.config.max_num_seqs, tokens), device=self.device)]
        logits = m.compute_logits(rows).float()
        torch.log_softmax(logits, dim=-1).sort(dim=-1)
        del scratch, hidden, logits
        torch.cuda.synchronize(self.device)

    def _cpu_swap_cache(self) -> torch.Tensor:
        if self._cpu_cache is None:
            shape = (*self.kv_cache.shape[:2], self.num_cpu_blocks, *self.kv_cache.shape[3:])
            self._cpu_cache = torch.empty(shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        return self._cpu_cache

    def _move_blocks(self, sched: SchedulerOutput) -> None:
        """Swap-outs first: their device blocks may be handed to other sequences in this very step."""
        if sched.blocks_to_swap_out:
            dev, cpu = zip(*sched.blocks_to_swap_out)
            self._cpu_swap_cache()[:, :, list(cpu)] = self.kv_cache[:, :, list(dev)].cpu()
        if sched.blocks_to_swap_in:
            cpu, dev = zip(*sched.blocks_to_swap_in)
            self.kv_cache[:, :, list(dev)] = self._cpu_swap_cache()[:, :, list(cpu)].to(self.device)
        if sched.blocks_to_copy:
            src, dst = zip(*sched.blocks_to_copy)
            self.kv_cache[:, :, list(dst)] = self.kv_cache[:, :, list(src)]

    # ------------------------------------------------------------------ the step
    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.new_requests:
            self.requests[new.req_id] = RunnerRequestState(
                list(new.token_ids), new.num_prompt_tokens, new.params, list(new.block_ids), new.sample_index,
                new.num_computed_tokens,
            )
        for cached in sched.cached_requests:
            state = self.requests[cached.req_id]
            if cached.block_ids is not None:
                state.block_ids = list(cached.block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        self._move_blocks(sched)
        if not sched.num_scheduled_tokens:
            return ModelRunnerOutput(sampled_token_ids={})

        bs = self.block_size
        ids, positions, slots, starts, seq_lens, tables = [], [], [], [0], [], []
        sample_rows, sample_ids = [], []
        prompt_lp: list[tuple[str, int, int, int]] = []  # (req, first row, first position, count)
        for req_id, n in sched.num_scheduled_tokens.items():
            st = self.requests[req_id]
            c = st.num_computed_tokens
            ids += st.token_ids[c:c + n]
            positions += range(c, c + n)
            slots += [st.block_ids[p // bs] * bs + p % bs for p in range(c, c + n)]
            if st.params.prompt_logprobs is not None and c < st.num_prompt_tokens - 1:
                prompt_lp.append((req_id, starts[-1], c, min(c + n, st.num_prompt_tokens - 1) - c))
            starts.append(starts[-1] + n)
            seq_lens.append(c + n)
            tables.append(st.block_ids)
            if c + n == len(st.token_ids):  # caught up: this step's last logits give the next token
                sample_rows.append(starts[-1] - 1)
                sample_ids.append(req_id)
            st.num_computed_tokens = c + n

        dev = self.device
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])),
            max_seq_len=max(seq_lens),
        )
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), self.kv_caches, meta)

        out = ModelRunnerOutput(sampled_token_ids={})
        for req_id, row, pos, count in prompt_lp:
            out.prompt_logprobs[req_id] = self._prompt_logprobs(self.requests[req_id], hidden[row:row + count], pos)
        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
            rows = []
            for req_id in sample_ids:
                st = self.requests[req_id]
                p = st.num_prompt_tokens
                rows.append(SamplingRow(st.params, st.token_ids[:p], st.token_ids[p:], st.sample_index))
            tokens, logprobs = self.sampler(logits, rows)
            for req_id, token, lp in zip(sample_ids, tokens, logprobs):
                self.requests[req_id].token_ids.append(token)
                out.sampled_token_ids[req_id] = [token]
                if lp is not None:
                    out.logprobs[req_id] = [lp]
        return out

    def _prompt_logprobs(self, st: RunnerRequestState, hidden: torch.Tensor, first_pos: int) -> list:
        """Logprob of each next prompt token for the prompt positions this step computed: (position, logprobs)."""
        logprobs = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
        targets = torch.tensor(st.token_ids[first_pos + 1:first_pos + 1 + hidden.shape[0]], device=self.device)
        lps = token_logprobs(logprobs, targets, [st.params.prompt_logprobs] * hidden.shape[0])
        return [(first_pos + 1 + i, lp) for i, lp in enumerate(lps)]
