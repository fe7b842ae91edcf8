"""The engine: requests in, a step of three calls, RequestOutputs out. No threads, no Ray, no HTTP."""

from __future__ import annotations

import atexit
import gc
import logging
import time
from typing import Callable

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.errors import InvalidRequestError
from gpt2serve.engine.kv_manager import KVCacheManager
from gpt2serve.engine.lora import (LoRAAdapter, LoRAError, UnknownLoRAError, lora_layers, merge_adapter,
                                   read_peft_adapter, startup_uid)
from gpt2serve.engine.model_runner import ModelRunner
from gpt2serve.engine.output_processor import OutputProcessor, RequestState, SequenceText
from gpt2serve.engine.outputs import RequestOutput, SchedulerOutput
from gpt2serve.engine.request import Request, RequestStatus
from gpt2serve.engine.sampling_params import SamplingParams
from gpt2serve.engine.scheduler import Scheduler
from gpt2serve.engine.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model.vocab_size
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, self.runner.num_cpu_blocks,
                                 config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv)
        self.tokenizer = load_tokenizer(config, self.runner.hf_config.eos_token_id)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.lora_names: dict[str, str] = {}  # adapter name -> uid of its current load
        self.merged_lora: str | None = None  # the adapter folded into the base weights, if any
        self._unloading: set[str] = set()  # uids unloaded while requests still use them
        for module in config.lora_modules:
            if module.merge:
                merge_adapter(self.runner.model, read_peft_adapter(
                    module.name, module.path, lora_layers(self.runner.model), config.max_lora_rank))
                self.merged_lora = module.name
            else:
                self.add_lora(module.name, module.path, startup_uid(module.name))
        self._timing = {"schedule_s": 0.0, "execute_s": 0.0, "update_s": 0.0}
        # Observers (telemetry): each gets every step's SchedulerOutput as soon as it is planned (requests still in
        # their pre-step state), and the step's whole duration in seconds once it is done.
        self.schedule_observers: list[Callable[[SchedulerOutput], None]] = []
        self.step_observers: list[Callable[[float], None]] = []
        # Start-up leaves millions of long-lived objects (modules, Triton and CUDA-graph state); every full
        # garbage collection would walk them again in the middle of a step. Freezing moves them out of its reach.
        # (Unfrozen at exit, so that shutdown still frees them.)
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)

    # ------------------------------------------------------------------ requests
    # ------------------------------------------------------------------ LoRA adapters
    def add_lora(self, name: str, path: str, uid: str | None = None) -> str:
        """Load a PEFT adapter under ``name`` and return its uid (LoRAError: malformed, too large a rank, name
        taken)."""
        return self.register_lora(self.read_lora(name, path, uid))

    def read_lora(self, name: str, path: str, uid: str | None = None) -> LoRAAdapter:
        """The file-reading half of ``add_lora``: touches no engine state, so it may run beside a step."""
        if self.runner.lora is None:
            raise LoRAError("LoRA is not enabled on this engine (enable_lora: true)")
        return read_peft_adapter(name, path, lora_layers(self.runner.model), self.config.max_lora_rank, uid)

    def register_lora(self, adapter: LoRAAdapter) -> str:
        """The engine-state half of ``add_lora``: from now on requests may name ``adapter.name``."""
        name = adapter.name
        if name in self.lora_names or name == self.merged_lora:
            raise LoRAError(f"an adapter named {name!r} is already loaded")
        if adapter.uid in self._unloading:  # unloaded, still finishing requests, and wanted again: keep that copy
            self._unloading.discard(adapter.uid)
        else:
            self.runner.lora.add(adapter)
        self.lora_names[name] = adapter.uid
        log.info("LoRA adapter %r (%s) loaded from %s (rank %d, %d layers, %.1f MB)", name, adapter.uid,
                 adapter.path, adapter.rank, len(adapter.weights), adapter.bytes / 2**20)
        return adapter.uid

    def remove_lora(self, name: str) -> None:
        """Unload ``name``: new requests for it are refused at once; requests already using it finish with it,
        and its weights go when the last of them ends."""
        uid = self.lora_names.pop(name, None)
        if uid is None:
            raise UnknownLoRAError(f"no adapter named {name!r} is loaded")
        self._unloading.add(uid)
        self._drop_unused_loras()

    def list_loras(self) -> list[str]:
        return sorted(self.lora_names) + ([self.merged_lora] if self.merged_lora else [])

    def _drop_unused_loras(self) -> None:
        if not self._unloading:
            return
        in_use = {r.lora_id for r in self.scheduler.requests.values()}
        for uid in self._unloading - in_use:
            self.runner.lora.remove(uid)
            self._unloading.discard(uid)

    # ------------------------------------------------------------------ requests
    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                     priority: int = 0, stream: bool = False, lora_name: str | None = None,
                     ) -> tuple[Request, RequestState]:
        """Validate and build a request without touching engine state; raises InvalidRequestError (and
        UnknownLoRAError for an adapter that is not loaded)."""
        params = params or SamplingParams()
        lora_id = None
        if lora_name is not None and lora_name != self.merged_lora:
            lora_id = self.lora_names.get(lora_name)
            if lora_id is None:
                raise UnknownLoRAError(f"no adapter named {lora_name!r} is loaded")
        if request_id in self.output_processor.states:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight", "request_id")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is out of vocabulary (ids must be in [0, {self.vocab_size}))", "prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, which must also "
                "leave room for at least one generated token", "prompt")
        max_total = self.max_model_len
        if params.max_tokens is not None:
            max_total = min(max_total, len(token_ids) + params.max_tokens)
        # The last token is sampled but never fed back, so it needs no KV slot.
        blocks_needed = self.kv.blocks_for(max_total - 1)
        if blocks_needed > self.kv.pool.num_blocks:
            raise InvalidRequestError(
                f"the request needs {blocks_needed} KV blocks ({max_total - 1} tokens) but the whole pool has "
                f"{self.kv.pool.num_blocks}; shorten the prompt or max_tokens", "max_tokens")
        eos = self.tokenizer.eos_token_id
        req = Request(
            request_id=request_id, external_id=request_id, prompt_token_ids=token_ids, params=params,
            arrival_time=time.monotonic(), max_total_tokens=max_total, eos_token_id=eos, priority=priority,
            samples_to_fork=params.n - 1, prompt_logprobs=[None] if params.prompt_logprobs is not None else [],
            lora_id=lora_id,
        )
        state = RequestState(
            request_id=request_id, prompt=text, prompt_token_ids=token_ids, params=params, stream=stream,
            arrival_time=req.arrival_time, seqs=[SequenceText(i) for i in range(params.n)],
        )
        return req, state

    def submit(self, req: Request, state: RequestState) -> None:
        self.output_processor.add(state)
        self.scheduler.add_request(req)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, stream: bool = False, lora_name: str | None = None) -> None:
        self.submit(*self.make_request(request_id, prompt, params, priority, stream, lora_name))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (waiting, mid-prefill, decoding, swapped); its blocks are freed now."""
        self.scheduler.abort(request_id)
        self._drop_unused_loras()
        return self.output_processor.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        for observe in self.schedule_observers:
            observe(sched)
        t1 = time.perf_counter()
        runner_out = self.runner.execute(sched)
        t2 = time.perf_counter()
        core_outputs = self.scheduler.update_from_output(sched, runner_out)

        outputs, stopped = self.output_processor.process(core_outputs)
        for req_id in stopped:
            self.scheduler.finish(req_id, RequestStatus.FINISHED_STOPPED)
        self._drop_unused_loras()
        t3 = time.perf_counter()
        self._timing["schedule_s"] += t1 - t0
        self._timing["execute_s"] += t2 - t1
        self._timing["update_s"] += t3 - t2
        for observe in self.step_observers:
            observe(t3 - t0)
        return outputs

    def shutdown(self) -> None:
        """Release what outlives the engine object: the follower ranks of a tensor- or pipeline-parallel model."""
        self.runner.shutdown()

    def stats(self) -> dict[str, float | int]:
        proposer = self.runner.proposer
        return {**self.scheduler.stats(), **(proposer.stats() if proposer is not None else {})}

    def step_timing(self) -> dict[str, float]:
        """Mean milliseconds per step: CPU work (schedule, input preparation, booking) and time in the runner's
        forward launch and sampling (sampling waits for the GPU, so it holds the device time)."""
        runner = self.runner.timing
        steps = max(runner["steps"], 1)
        ms = {k.removesuffix("_s") + "_ms": 1000 * v / steps for k, v in self._timing.items()}
        ms.update({k.removesuffix("_s") + "_ms": 1000 * v / steps for k, v in runner.items() if k != "steps"})
        ms["cpu_ms"] = ms["schedule_ms"] + ms["prepare_ms"] + ms["update_ms"]
        ms["steps"] = runner["steps"]
        return ms
