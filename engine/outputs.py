"""What crosses between the three calls of a step, and what the engine hands its callers.

Scheduler → runner is a diff: a request's full data goes over once (when it is new or resumes after a
preemption), then only its new blocks. Runner → scheduler is plain lists and dicts, no tensors, so that the
two can live in different processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpt2serve.engine.request import TokenLogprobs
from gpt2serve.engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    sample_index: int
    lora_id: str | None = None


@dataclass
class CachedRequestData:
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int] | None = None  # the whole table, when copy-on-write replaced entries of it


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # batch order
    finished_req_ids: set[str]  # finished, aborted or preempted since the last step: the runner drops them
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, cpu)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, device)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), copy-on-write
    # Proposed tokens scheduled for verification, by request: they follow its last token in this step's input.
    scheduled_spec_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens and not self.blocks_to_swap_out


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]]  # requests that produced tokens this step
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # Prompt positions computed this step: position p holds the logprob of prompt token p (p >= 1).
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprobs]]] = field(default_factory=dict)
    # Speculative decoding: each request's proposals for its next step.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One sequence's progress in one step."""

    req_id: str
    external_id: str
    sample_index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, with the first token


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """A request's result: whole (offline API) or the delta since the last one (streaming API)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float | int | None] = field(default_factory=dict)
