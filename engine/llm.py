"""The offline API: ``LLM(...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.llm_engine import LLMEngine
from gpt2serve.engine.outputs import RequestOutput
from gpt2serve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any):
        self.engine = LLMEngine(config or EngineConfig(**kwargs))
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        priority: Sequence[int] | None = None,
        lora_name: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in the order of the prompts.

        All requests are validated before any is queued, so that one bad prompt leaves nothing half-done.
        """
        inputs: list[str | list[int]] = (
            [prompts] if isinstance(prompts, str) else list(prompts or [])
        ) + [list(p) for p in (prompt_token_ids or [])]
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            sampling_params = [sampling_params or SamplingParams()] * len(inputs)
        if len(sampling_params) != len(inputs):
            raise ValueError(f"{len(inputs)} prompts but {len(sampling_params)} sampling params")
        priority = list(priority) if priority is not None else [0] * len(inputs)
        loras = [lora_name] * len(inputs) if lora_name is None or isinstance(lora_name, str) else list(lora_name)

        ids = [f"offline-{next(self._ids)}" for _ in inputs]
        built = [self.engine.make_request(rid, prompt, params, prio, lora_name=lora)
                 for rid, prompt, params, prio, lora in zip(ids, inputs, sampling_params, priority, loras, strict=True)]
        for req, state in built:
            self.engine.submit(req, state)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]
