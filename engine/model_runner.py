"""The model runner: owns the weights and the KV pool tensors, turns a SchedulerOutput into one forward pass.

It keeps its own per-request state (token ids, a row of the block table), so that the scheduler only sends
what changed. Step inputs are built with numpy over whole arrays (no per-token Python loop) into pinned
buffers; on a GPU, decode-only steps replay a CUDA graph captured for the next batch-size bucket (a cascade graph
when the step's sequences share a prefix), and so do speculative verify steps (a verify graph, whose requests all
have 1 + k query tokens: see ``_prepare``).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from gpt2serve.engine.attention import AttentionMetadata, find_shared_prefixes, get_attention_backend
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.cuda_graphs import DecodeGraphs, verify_layout
from gpt2serve.engine.distributed import Ranks, init_ranks, launch_followers
from gpt2serve.engine.kv_manager import cdiv
from gpt2serve.engine.loader import load_model, resolve_device, resolve_dtype, weight_bytes
from gpt2serve.engine.lora import LoRAManager
from gpt2serve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from gpt2serve.engine.sampler import Sampler, SamplingRow, token_logprobs
from gpt2serve.engine.sampling_params import SamplingParams
from gpt2serve.engine.spec_decode.proposer import ProposalRequest, build_proposer
from gpt2serve.engine.spec_decode.rejection import greedy_accept, rejection_sample

log = logging.getLogger(__name__)

# Cascade attention (docs/shared-prefix-attention.md) for decode steps where at least CASCADE_MIN_GROUP sequences
# share at least CASCADE_MIN_PREFIX_TOKENS leading tokens. Below 8 sequences the prefix pass's 16-row MMA tiles are
# mostly padding and the saving (7 of 8 reads of the prefix) does not pay for two extra launches and the fp32
# partials; below 256 shared tokens (16 blocks) the prefix is a small part of each context, so the step would
# save little, and it may have to pad up to a coarser graph bucket (engine/cuda_graphs.py). Starting points, to
# be tuned on the GPU.
CASCADE_MIN_GROUP = 8
CASCADE_MIN_PREFIX_TOKENS = 256


class RunnerLoRAManager(LoRAManager):
    """The runner's LoRA slots, marking the layers that loaded adapters target (``Linear.lora_targeted``): the
    others skip the LoRA kernels. The mark is never cleared (an unloaded adapter's layers keep it; their stacks
    are zeros or another adapter's, so the result is right either way), so the LoRA decode graphs, which bake the
    marks in, are recaptured only when the set grows (``targets_grew``)."""

    def __init__(self, model, max_loras: int, max_rank: int, max_cpu_loras: int | None = None):
        super().__init__(model, max_loras, max_rank, max_cpu_loras)
        self.targets_grew = False

    def add(self, adapter) -> None:
        super().add(adapter)
        for name in adapter.weights:
            layer = self.layers[name]
            if not layer.lora_targeted:
                layer.lora_targeted = self.targets_grew = True

    @contextmanager
    def every_layer_targeted(self):
        """Every layer runs the LoRA kernels inside: warm-up and memory profiling see what any adapter costs."""
        marks = {name: layer.lora_targeted for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.lora_targeted = True
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.lora_targeted = marks[name]


@dataclass
class RunnerRequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    row: int  # this request's row in the runner's block table
    num_blocks: int
    sample_index: int
    num_computed_tokens: int = 0
    lora_id: str | None = None


@dataclass
class SpecHistory:
    """How well a request's proposals have been doing, so that it stops paying for verification that fails.

    A verify step costs more than a decode step (measured on the H100 at batch 1: ~5.1 ms against ~3.0 ms for
    GPT-2 XL with k = 4), so proposals accepted too rarely make a request slower than not speculating at all. Below
    the threshold a request pauses: 4 steps, then twice as long after each failed probe, up to 64.
    """

    acceptance: float = 1.0  # moving average of accepted / proposed
    pause: int = 0
    backoff: int = 4

    def update(self, accepted_fraction: float, threshold: float) -> None:
        self.acceptance = 0.5 * self.acceptance + 0.5 * accepted_fraction
        if self.acceptance < threshold:
            self.pause, self.backoff = self.backoff, min(2 * self.backoff, 64)
        else:
            self.backoff = 4

    def paused(self) -> bool:
        if self.pause > 0:
            self.pause -= 1
            return True
        return False


@dataclass
class StepInputs:
    """A step's model inputs on the device, and where the sampled rows are."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: np.ndarray  # flat-batch rows whose logits pick a request's next token
    sample_ids: list[str]
    prompt_logprobs: list[tuple[str, int, int, int]]  # (request, first row, first position, count)
    decode_only: bool
    # Speculative decoding: requests verifying proposals, and their rows (last token + each proposal), in order.
    spec_ids: list[str]
    spec_rows: np.ndarray
    # The step is laid out for a verify CUDA graph (``verify_layout``: q rows per request, padding after the real
    # tokens; sample_rows and spec_rows are graph rows). Its metadata is then only for ``DecodeGraphs.run_verify``:
    # sequence lengths include the padding, which reads block-table columns past those copied here.
    verify_graph: bool = False
    logit_rows: torch.Tensor | None = None  # verify graphs: sample_rows then spec_rows, on the device


class HostStaging:
    """Host-to-device copies of step inputs through reusable pinned buffers (allocating pinned memory each
    step would cost more than the copy). A buffer is rewritten only after the previous step's sampling has
    synchronised, so an in-flight asynchronous copy never reads a half-written buffer."""

    def __init__(self, device: torch.device, pin: bool):
        self.device, self.pin = device, pin
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._copied = torch.cuda.Event() if pin else None  # the last step's copies have left the buffers

    def begin(self) -> None:
        """Wait until the previous step's copies are done before overwriting their buffers (a step that
        samples nothing never synchronises otherwise)."""
        if self._copied is not None:
            self._copied.synchronize()

    def end(self) -> None:
        if self._copied is not None:
            self._copied.record()

    def to_device(self, array: np.ndarray, dtype: torch.dtype, name: str = "") -> torch.Tensor:
        if not self.pin:
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype)
        key = (name, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < array.size:
            buf = torch.empty(max(array.size, 1024), dtype=dtype, pin_memory=True)
            self._buffers[key] = buf
        view = buf[:array.size].view(array.shape)
        view.numpy()[...] = array
        return view.to(self.device, non_blocking=True)


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, init_method: str | None = None):
        """``rank`` / ``init_method``: set for the follower ranks of a tensor- or pipeline-parallel model, which
        rank 0's runner starts itself (engine/distributed.py)."""
        self.config = config
        self.device = resolve_device(config)
        self.ranks, self._join_followers = Ranks(), None
        size = config.num_ranks
        if size > 1:
            if init_method is None:  # the driver: start the other ranks, then meet them
                init_method, self._join_followers = launch_followers(config, size)
            if self.device.type == "cuda":  # one GPU per rank: its own process's only one (Ray), or the rank-th
                self.device = torch.device("cuda", rank % torch.cuda.device_count())
            self.ranks = init_ranks(rank, config.tensor_parallel_size, config.pipeline_parallel_size, init_method,
                                    self.device, config.pipeline_micro_batches)
        self.dtype = resolve_dtype(config, self.device)
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.model, self.hf_config = load_model(config, self.backend, self.device, self.dtype, self.ranks.tp, self.ranks.pp)
        self.block_size = config.block_size
        self.max_model_len = min(config.max_model_len or self.hf_config.n_positions, self.hf_config.n_positions)
        self.max_blocks_per_seq = cdiv(self.max_model_len, self.block_size)
        m = self.model
        self.bytes_per_block = 2 * m.num_layers * self.block_size * m.num_heads * m.head_dim * self.dtype.itemsize
        # LoRA slots and a draft model's weights and pool come first, so that the pool is sized from what they leave.
        self.lora = RunnerLoRAManager(self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras) \
            if config.enable_lora else None
        self.proposer = build_proposer(config, self.device, self.dtype, self.backend)
        self.num_spec_tokens = config.speculative.num_speculative_tokens if config.speculative else 0
        self._draft_probs: dict[str, torch.Tensor] = {}  # the proposer's q for each request's pending proposals
        self._spec_history: dict[str, SpecHistory] = {}
        self.min_acceptance_rate = config.speculative.min_acceptance_rate if config.speculative else 0.0
        self.num_blocks = self.ranks.min_int(config.num_gpu_blocks or self._profile_num_blocks())
        self.kv_cache = torch.zeros(
            (m.num_layers, 2, self.num_blocks, self.block_size, m.num_heads, m.head_dim),
            device=self.device, dtype=self.dtype,
        )
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.num_cpu_blocks = int(config.swap_space_gib * 2**30 // self.bytes_per_block)
        self._cpu_cache: torch.Tensor | None = None  # swap space, allocated on first swap-out
        self.sampler = Sampler(self.device, config.seed)
        self.requests: dict[str, RunnerRequestState] = {}
        # One block-table row per live request; a request keeps its row until it finishes or is preempted.
        self.block_table = np.zeros((config.max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        self._pin = self.device.type == "cuda"
        self._staging = HostStaging(self.device, pin=self._pin)
        self.timing = {"steps": 0, "prepare_s": 0.0, "forward_s": 0.0, "sample_s": 0.0}
        log.info(
            "KV pool: %d blocks of %d tokens = %d tokens (%.2f GiB, %s on %s); swap space %d blocks",
            self.num_blocks, self.block_size, self.num_blocks * self.block_size,
            self.num_blocks * self.bytes_per_block / 2**30, self.dtype, self.device, self.num_cpu_blocks,
        )
        # Tests flip this to compare cascade and ordinary decode; the torch backend would ignore the metadata.
        self.cascade_enabled = self.backend.name == "triton"
        self.cascade_steps = 0  # decode steps that ran cascade attention
        self.cascade_graph_steps = 0  # ... of which replayed a cascade CUDA graph
        self.verify_graph_steps = 0  # speculative verify steps that replayed a verify CUDA graph
        # Not yet with several ranks: the graphs would have to capture the collectives (NCCL can; untested).
        use_graphs = (self.device.type == "cuda" and not config.enforce_eager and self.backend.name != "torch"
                      and self.ranks.size == 1)
        if self.device.type == "cuda":
            # With graphs, every cascade step replays one, and capturing compiles what it needs.
            self._warm_up(eager_cascade=self.cascade_enabled and not use_graphs)
        self.graphs = None
        if use_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, config.max_num_seqs, self.max_blocks_per_seq,
                                       self.max_model_len, self.device, lora=self.lora is not None,
                                       cascade_min_rows=CASCADE_MIN_GROUP if self.cascade_enabled else None,
                                       verify_query_len=1 + self.num_spec_tokens if config.speculative else None)

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
        # CUDA graphs keep their own activation memory; leave room for the largest batch's graph pool.
        available = total * self.config.gpu_memory_utilization - peak - max(non_torch, 0)
        num_blocks = int(available // self.bytes_per_block)
        log.info(
            "memory profile: %.1f GiB x %.2f; weights %.2f GiB, activation peak %.2f GiB, non-torch %.2f GiB "
            "-> %.2f GiB for the KV pool", total / 2**30, self.config.gpu_memory_utilization, weights / 2**30,
            (peak - weights) / 2**30, non_torch / 2**30, available / 2**30,
        )
        if num_blocks < 1:
            raise RuntimeError("no GPU memory left for the KV pool; raise gpu_memory_utilization or shrink batches")
        actual, dense = weight_bytes(self.model, self.dtype)
        if dense > actual:
            freed = dense - actual
            log.info("%s weights: %.2f GiB instead of %.2f GiB in %s; the %.2f GiB freed hold %d more KV blocks "
                     "(%d tokens)", self.model.linear_method.name, actual / 2**30, dense / 2**30, self.dtype,
                     freed / 2**30, freed // self.bytes_per_block, freed // self.bytes_per_block * self.block_size)
        return num_blocks

    @torch.inference_mode()
    def _dummy_forward(self, query_lens: list[int], context_lens: list[int], kv_caches: list[torch.Tensor],
                       num_sampled: int, shared_blocks: int = 0,
                       cascade_splits: tuple[int, int] | None = None) -> None:
        """One forward pass of made-up sequences: sequence i has ``context_lens[i]`` tokens already cached and
        ``query_lens[i]`` new ones. Its blocks are the pool's first ones, in order (the pool is empty here), except
        that with ``shared_blocks`` all sequences share their first blocks (a decode step then runs cascade
        attention, with ``cascade_splits`` = (prefix, suffix) split counts if given)."""
        m, bs, dev = self.model, self.block_size, self.device
        seq_lens = np.array(query_lens) + np.array(context_lens)
        blocks_per_seq = cdiv(int(seq_lens.max()), bs)
        tables = np.arange(len(query_lens) * blocks_per_seq, dtype=np.int32).reshape(len(query_lens), -1)
        tables[:, :shared_blocks] = np.arange(shared_blocks, dtype=np.int32)
        positions = np.concatenate([np.arange(c, c + q) for q, c in zip(query_lens, context_lens)])
        seq_of = np.repeat(np.arange(len(query_lens)), query_lens)
        slots = tables[seq_of, positions // bs].astype(np.int64) * bs + positions % bs
        meta = AttentionMetadata(
            torch.from_numpy(slots).to(dev),
            torch.tensor(np.concatenate([[0], np.cumsum(query_lens)]), dtype=torch.int32, device=dev),
            torch.tensor(seq_lens, dtype=torch.int32, device=dev), torch.from_numpy(tables).to(dev),
            max(query_lens), int(seq_lens.max()),
        )
        if shared_blocks:
            cascade = find_shared_prefixes(tables, seq_lens, bs, CASCADE_MIN_GROUP, CASCADE_MIN_PREFIX_TOKENS)
            assert cascade is not None, "the warm-up's shared blocks do not make a cascade step"
            meta.cascade = cascade.to_device(
                lambda a, dtype, name="": torch.from_numpy(np.ascontiguousarray(a)).to(dev, dtype))
            if cascade_splits is not None:
                meta.cascade.prefix_splits, meta.cascade.num_splits = cascade_splits
        if self.lora is not None:  # slot 0 (zeros until an adapter is loaded): compiles and sizes the LoRA kernels
            meta.lora_slots = torch.zeros(len(positions), dtype=torch.int32, device=dev)
        ids = torch.randint(0, m.vocab_size, (len(positions),), device=dev)
        with self.lora.every_layer_targeted() if self.lora is not None else nullcontext():
            hidden = m(ids, torch.from_numpy(positions).to(dev), kv_caches, meta)
        logits = m.compute_logits(hidden[:num_sampled]).float()
        torch.log_softmax(logits, dim=-1).sort(dim=-1)

    def _profile_run(self) -> None:
        """One step of max_num_batched_tokens prompt tokens and max_num_seqs sampled rows, on a scratch pool."""
        m = self.model
        tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        seq_len = min(tokens, self.max_model_len)
        lens = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
        blocks = len(lens) * cdiv(seq_len, self.block_size)
        scratch = torch.zeros((m.num_layers, 2, blocks, self.block_size, m.num_heads, m.head_dim),
                              device=self.device, dtype=self.dtype)
        self._dummy_forward(lens, [0] * len(lens), list(scratch.unbind(0)), min(self.config.max_num_seqs, tokens))
        del scratch
        torch.cuda.synchronize(self.device)

    def _warm_up(self, eager_cascade: bool) -> None:
        """Compile the Triton kernels' variants before the first request, so that no request waits for a compile.

        Triton compiles a kernel per tile height (from the longest query: 1, 16, 32 or 64 rows), split count and
        dtype, and per integer argument it specialises being 1, a multiple of 16, or neither (the attention kernels
        leave the batch's counts unspecialised; the batch sizes below cover the other kernels). A cold W1 run
        that compiled them while timed measured 10,093 output tok/s, a warm one 12,736. ``eager_cascade``: cascade
        steps will run eagerly (no graphs), so compile each of their variants too
        (``kernels.cascade_attention.warm_up_variants``).
        """
        start = time.perf_counter()
        shapes = [([q] * n, [0] * n) for q in (9, 16, 20, 48, 100) for n in (1, 2, 16, 17)]  # prefill
        shapes += [([1] * n, [c] * n) for n in (1, 2, 3, 16, 17, 32) for c in (40, 600)]  # decode, split-K or not
        shapes += [([31] + [1] * (n - 1), [0] + [50] * (n - 1)) for n in (2, 16, 17)]  # prefill beside decodes
        shapes = [(q, c, 0, None) for q, c in shapes]
        if eager_cascade:
            from gpt2serve.kernels.cascade_attention import warm_up_variants

            # Every sequence behind one prefix of CASCADE_MIN_PREFIX_TOKENS, with a few tokens of its own.
            shared = cdiv(CASCADE_MIN_PREFIX_TOKENS, self.block_size)
            variants = warm_up_variants(self.model.num_heads, CASCADE_MIN_GROUP, self.config.max_num_seqs,
                                        self.max_model_len, self.dtype, self.device)
            shapes += [([1] * rows, [shared * self.block_size + 40] * rows, shared, (prefix_splits, num_splits))
                       for rows, prefix_splits, num_splits in variants]
        ran = 0
        for query_lens, context_lens, shared_blocks, splits in shapes:
            longest = max(q + c for q, c in zip(query_lens, context_lens))
            if longest > self.max_model_len or cdiv(longest, self.block_size) * len(query_lens) > self.num_blocks:
                continue
            self._dummy_forward(query_lens, context_lens, self.kv_caches, len(query_lens), shared_blocks, splits)
            ran += 1
        torch.cuda.synchronize(self.device)
        log.info("kernel warm-up: %d step shapes in %.1f s", ran, time.perf_counter() - start)

    def _cpu_swap_cache(self) -> torch.Tensor:
        if self._cpu_cache is None:
            shape = (*self.kv_cache.shape[:2], self.num_cpu_blocks, *self.kv_cache.shape[3:])
            self._cpu_cache = torch.empty(shape, dtype=self.dtype, pin_memory=self._pin)
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

    # ------------------------------------------------------------------ per-request state
    def _set_blocks(self, st: RunnerRequestState, block_ids: list[int], append: bool) -> None:
        start = st.num_blocks if append else 0
        self.block_table[st.row, start:start + len(block_ids)] = block_ids
        st.num_blocks = start + len(block_ids)

    def _update_states(self, sched: SchedulerOutput) -> None:
        if self.proposer is not None and sched.finished_req_ids:
            self.proposer.drop(sched.finished_req_ids)
            for req_id in sched.finished_req_ids:
                self._draft_probs.pop(req_id, None)
                self._spec_history.pop(req_id, None)
        for req_id in sched.finished_req_ids:
            st = self.requests.pop(req_id, None)
            if st is not None:
                self._free_rows.append(st.row)
        for new in sched.new_requests:
            st = RunnerRequestState(list(new.token_ids), new.num_prompt_tokens, new.params, self._free_rows.pop(), 0,
                                    new.sample_index, new.num_computed_tokens, new.lora_id)
            self._set_blocks(st, new.block_ids, append=False)
            self.requests[new.req_id] = st
        for cached in sched.cached_requests:
            st = self.requests[cached.req_id]
            if cached.block_ids is not None:
                self._set_blocks(st, cached.block_ids, append=False)
            elif cached.new_block_ids:
                self._set_blocks(st, cached.new_block_ids, append=True)
            st.num_computed_tokens = cached.num_computed_tokens

    # ------------------------------------------------------------------ the step
    def _prepare(self, sched: SchedulerOutput) -> StepInputs:
        req_ids = list(sched.num_scheduled_tokens)
        states = [self.requests[r] for r in req_ids]
        counts = np.fromiter(sched.num_scheduled_tokens.values(), dtype=np.int64, count=len(req_ids))
        computed = np.fromiter((st.num_computed_tokens for st in states), dtype=np.int64, count=len(states))
        rows = np.fromiter((st.row for st in states), dtype=np.int64, count=len(states))
        starts = np.zeros(len(req_ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        seq_lens = computed + counts
        spec = sched.scheduled_spec_tokens
        num_spec = np.fromiter((len(spec.get(r, ())) for r in req_ids), dtype=np.int64, count=len(req_ids)) \
            if spec else np.zeros(len(req_ids), dtype=np.int64)
        known = np.fromiter((len(st.token_ids) for st in states), dtype=np.int64, count=len(states))
        caught_up = seq_lens == known + num_spec
        decode_only = bool((counts == 1).all() and caught_up.all())
        # A verify graph takes a step in which every request is a plain decode (a verify of 0 proposals) or verifies
        # its proposals: nobody is mid-prefill, and nobody has more than 1 + k tokens.
        q = 1 + self.num_spec_tokens
        verify_graph = bool(
            not decode_only and self.graphs is not None and self.graphs.fits_verify(len(req_ids))
            and num_spec.any() and (counts == 1 + num_spec).all() and caught_up.all() and counts.max() <= q
        )
        if decode_only:  # the common case: one token each, the last one
            ids = [st.token_ids[-1] for st in states]
            positions = computed
            token_rows = rows
        else:
            # A verifying request's input is its last token followed by its proposals.
            ids = [t for r, st, c, n in zip(req_ids, states, computed, counts)
                   for t in (st.token_ids[c:] + spec[r] if r in spec else st.token_ids[c:c + n])]
            seq_of = np.repeat(np.arange(len(req_ids)), counts)
            positions = computed[seq_of] + np.arange(starts[-1]) - starts[seq_of]
            token_rows = rows[seq_of]
        bs = self.block_size
        slots = self.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs

        sample_idx = np.nonzero(caught_up & (num_spec == 0))[0]
        sample_rows = starts[1:][sample_idx] - 1
        spec_idx = np.nonzero(num_spec)[0]
        # Row j of a verifying request is the position after its j-th proposal (j = 0: after its last token).
        spec_rows = np.concatenate([np.arange(starts[i + 1] - 1 - num_spec[i], starts[i + 1]) for i in spec_idx]) \
            if len(spec_idx) else np.zeros(0, dtype=np.int64)
        prompt_lp = []
        for i, st in enumerate(states):
            c, n = int(computed[i]), int(counts[i])
            if st.params.prompt_logprobs is not None and c < st.num_prompt_tokens - 1:
                prompt_lp.append((req_ids[i], int(starts[i]), c, min(c + n, st.num_prompt_tokens - 1) - c))
            st.num_computed_tokens = c + n

        width = cdiv(int(seq_lens.max()), bs)
        tables = self.block_table[rows, :width]
        logit_rows = None
        if verify_graph:
            # Into the graph's layout: padding after each request's real tokens (slot -1, positions clamped into
            # the position table), every request q tokens long, and the logits rows mapped to their graph rows.
            layout = verify_layout(num_spec, q)
            ids = layout.pad(np.asarray(ids, dtype=np.int64), 0)
            positions = np.minimum(computed[:, None] + np.arange(q), self.max_model_len - 1).ravel()
            slots = layout.pad(slots, -1)
            starts, seq_lens = layout.query_start_loc, computed + q
            sample_rows, spec_rows = layout.token_rows[sample_rows], layout.token_rows[spec_rows]
            logit_rows = np.concatenate([sample_rows, spec_rows])
        cascade = None
        if decode_only and self.cascade_enabled:
            cascade = find_shared_prefixes(tables, seq_lens, bs, CASCADE_MIN_GROUP, CASCADE_MIN_PREFIX_TOKENS)
        lora_slots = self._lora_slots(states, counts, decode_only)
        self._staging.begin()
        to_dev = self._staging.to_device
        meta = AttentionMetadata(
            slot_mapping=to_dev(slots, torch.int64, "slots"),
            query_start_loc=to_dev(starts, torch.int32, "starts"),
            seq_lens=to_dev(seq_lens, torch.int32, "seq_lens"),
            block_tables=to_dev(tables, torch.int32, "tables"),
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
            cascade=cascade.to_device(to_dev) if cascade is not None else None,
            lora_slots=to_dev(lora_slots, torch.int32, "lora") if lora_slots is not None else None,
        )
        inputs = StepInputs(
            input_ids=to_dev(np.asarray(ids, dtype=np.int64), torch.int64, "ids"),
            positions=to_dev(np.asarray(positions, dtype=np.int64), torch.int64, "positions"),
            meta=meta, sample_rows=sample_rows, sample_ids=[req_ids[i] for i in sample_idx],
            prompt_logprobs=prompt_lp, decode_only=decode_only,
            spec_ids=[req_ids[i] for i in spec_idx], spec_rows=spec_rows, verify_graph=verify_graph,
            logit_rows=to_dev(logit_rows, torch.int64, "logit_rows") if logit_rows is not None else None,
        )
        self._staging.end()
        return inputs

    def _lora_slots(self, states: list[RunnerRequestState], counts: np.ndarray, decode_only: bool) -> np.ndarray | None:
        """Each token row's adapter slot (-1: none), making the step's adapters resident; None without any."""
        if self.lora is None:
            return None
        uids = {st.lora_id for st in states if st.lora_id is not None}
        if not uids:
            return None
        slot_of = self.lora.slot_map(uids)
        per_request = np.fromiter((slot_of.get(st.lora_id, -1) if st.lora_id else -1 for st in states),
                                  dtype=np.int32, count=len(states))
        return per_request if decode_only else np.repeat(per_request, counts)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        if self.ranks.size > 1 and self.ranks.is_driver:
            self.ranks.broadcast(("step", sched))
        self._update_states(sched)
        self._move_blocks(sched)
        if not sched.num_scheduled_tokens:
            return ModelRunnerOutput(sampled_token_ids={})
        if self.lora is not None and self.lora.targets_grew:
            # An adapter targets layers the LoRA graphs skip: recapture them (seconds, once per new layer set).
            self.lora.targets_grew = False
            if self.graphs is not None:
                self.graphs.capture_lora()
        inputs = self._prepare(sched)
        t1 = time.perf_counter()

        out = ModelRunnerOutput(sampled_token_ids={})
        num_seqs = len(sched.num_scheduled_tokens)
        cascade = inputs.meta.cascade is not None
        self.cascade_steps += cascade
        if inputs.decode_only and self.graphs is not None and self.graphs.fits(
                num_seqs, cascade, lora=inputs.meta.lora_slots is not None):
            self.cascade_graph_steps += cascade
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        elif inputs.verify_graph:
            self.verify_graph_steps += 1
            logits = self.graphs.run_verify(inputs.input_ids, inputs.positions, inputs.meta)[inputs.logit_rows]
            logits = self._verify_rows(logits, inputs, sched, out)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
            for req_id, row, pos, count in inputs.prompt_logprobs:
                out.prompt_logprobs[req_id] = self._prompt_logprobs(self.requests[req_id], hidden[row:row + count], pos)
            logits = None
            if len(inputs.sample_ids) or len(inputs.spec_ids):
                rows = torch.from_numpy(np.concatenate([inputs.sample_rows, inputs.spec_rows])).to(self.device)
                logits = self._verify_rows(self.model.compute_logits(hidden[rows]), inputs, sched, out)
        t2 = time.perf_counter()

        if logits is not None and self.ranks.is_driver:
            rows = []
            for req_id in inputs.sample_ids:
                st = self.requests[req_id]
                rows.append(SamplingRow(st.params, st.token_ids, st.num_prompt_tokens, st.sample_index))
            tokens, logprobs = self.sampler(logits, rows)
            for req_id, token, lp in zip(inputs.sample_ids, tokens, logprobs):
                self.requests[req_id].token_ids.append(token)
                out.sampled_token_ids[req_id] = [token]
                if lp is not None:
                    out.logprobs[req_id] = [lp]
        if logits is not None and self.ranks.size > 1:  # rank 0 samples; every rank's states need the tokens
            sampled = self.ranks.broadcast(out.sampled_token_ids)
            if not self.ranks.is_driver:
                for req_id, tokens in sampled.items():
                    self.requests[req_id].token_ids.extend(tokens)
        if self.proposer is not None and out.sampled_token_ids:
            self._propose(out)
        t3 = time.perf_counter()
        tm = self.timing
        tm["steps"] += 1
        tm["prepare_s"] += t1 - t0
        tm["forward_s"] += t2 - t1  # launch time: the GPU runs on asynchronously until sampling reads tokens
        tm["sample_s"] += t3 - t2
        return out

    # ------------------------------------------------------------------ several ranks (engine/distributed.py)
    def follow(self) -> None:
        """A follower rank's life: run every step the driver sends, until it says stop."""
        while True:
            kind, sched = self.ranks.broadcast()
            if kind == "stop":
                break
            self.execute(sched)
        torch.distributed.destroy_process_group()

    def shutdown(self) -> None:
        """Stop the follower ranks (the driver's; a no-op with one rank, and after the first call)."""
        if self.ranks.size > 1 and self.ranks.is_driver and self._join_followers is not None:
            self.ranks.broadcast(("stop", None))
            self._join_followers()
            self._join_followers = None
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ speculative decoding
    def _verify_rows(self, logits: torch.Tensor, inputs: StepInputs, sched: SchedulerOutput,
                     out: ModelRunnerOutput) -> torch.Tensor | None:
        """``logits``: the step's sampled rows, then its verified ones. Verifies the latter; returns the former (None
        if there are none)."""
        if not len(inputs.spec_ids):
            return logits
        self._verify(logits[len(inputs.sample_ids):], inputs.spec_ids, sched.scheduled_spec_tokens, out)
        return logits[:len(inputs.sample_ids)] if len(inputs.sample_ids) else None

    def _verify(self, logits: torch.Tensor, req_ids: list[str], spec: dict[str, list[int]],
                out: ModelRunnerOutput) -> None:
        """Accept or reject each verifying request's proposals (``logits``: its rows, last token first)."""
        nums = [len(spec[r]) for r in req_ids]
        k, batch, vocab = max(nums), len(req_ids), logits.shape[1]
        offsets = np.concatenate([[0], np.cumsum(np.asarray(nums) + 1)[:-1]])
        # [B, k + 1] row indices, padded by repeating each request's last row (padding is never read).
        index = offsets[:, None] + np.minimum(np.arange(k + 1)[None, :], np.asarray(nums)[:, None])
        target = logits[torch.from_numpy(index).to(self.device)]
        drafts = torch.tensor([spec[r] + [0] * (k - len(spec[r])) for r in req_ids], device=self.device)
        num_drafts = torch.tensor(nums, device=self.device)
        states = [self.requests[r] for r in req_ids]
        if all(st.params.greedy for st in states):
            tokens, emitted = greedy_accept(drafts, num_drafts, target.argmax(dim=-1))
        else:
            # Row (b, j) samples output position len(outputs) + j: its seeds follow that position.
            rows = [SamplingRow(st.params, st.token_ids + spec[r][:j], st.num_prompt_tokens, st.sample_index)
                    for r, st in zip(req_ids, states) for j in range(k + 1)]
            probs = self.sampler.probs(target.reshape(batch * (k + 1), vocab), rows).reshape(batch, k + 1, vocab)
            noise = self.sampler.exponential_noise(rows, vocab).reshape(batch, k + 1, vocab)
            uniforms = self.sampler.uniforms(rows).reshape(batch, k + 1)[:, :k]
            draft_probs = None
            if any(r in self._draft_probs for r in req_ids):
                # Deterministic proposals are one-hot distributions.
                draft_probs = torch.zeros(batch, k, vocab, device=self.device)
                draft_probs.scatter_(2, drafts[:, :, None], 1.0)
                for b, r in enumerate(req_ids):
                    q = self._draft_probs.get(r)
                    if q is not None:
                        draft_probs[b, :nums[b]] = q[:nums[b]]
            greedy = torch.tensor([st.params.greedy for st in states], device=self.device)
            tokens, emitted = rejection_sample(drafts, num_drafts, probs, draft_probs, greedy, uniforms, noise)
        for r, st, row, n, m in zip(req_ids, states, tokens.tolist(), emitted.tolist(), nums):
            st.token_ids.extend(row[:n])
            out.sampled_token_ids[r] = row[:n]
            self._draft_probs.pop(r, None)
            self._spec_history.setdefault(r, SpecHistory()).update((n - 1) / m, self.min_acceptance_rate)

    def _propose(self, out: ModelRunnerOutput) -> None:
        """Proposals for the next step of every request that just produced tokens and may speculate."""
        batch = []
        for req_id in out.sampled_token_ids:
            st = self.requests[req_id]
            p = st.params
            # Penalties and logprobs would need the target's distribution re-derived per verified position.
            if (not p.speculative or p.logprobs is not None or p.prompt_logprobs is not None
                    or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
                continue
            history = self._spec_history.get(req_id)
            if history is not None and history.paused():
                continue
            batch.append(ProposalRequest(req_id, st.token_ids, st.num_prompt_tokens, self.num_spec_tokens, p,
                                         st.sample_index))
        if not batch:
            return
        for req_id, proposal in self.proposer.propose(batch).items():
            if proposal.token_ids:
                out.spec_token_ids[req_id] = list(proposal.token_ids)
                if proposal.probs is not None:
                    self._draft_probs[req_id] = proposal.probs

    def _prompt_logprobs(self, st: RunnerRequestState, hidden: torch.Tensor, first_pos: int) -> list:
        """Logprob of each next prompt token for the prompt positions this step computed: (position, logprobs)."""
        logprobs = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
        targets = torch.tensor(st.token_ids[first_pos + 1:first_pos + 1 + hidden.shape[0]], device=self.device)
        lps = token_logprobs(logprobs, targets, [st.params.prompt_logprobs] * hidden.shape[0])
        return [(first_pos + 1 + i, lp) for i, lp in enumerate(lps)]
