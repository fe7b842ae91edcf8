"""A request as the scheduler sees it: one sequence of tokens and how far its K/V has been computed."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from gpt2serve.engine.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED  # read per request per step: a set, not a tuple built at each call


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


@dataclass
class TokenLogprobs:
    """Log-probability of one chosen token, its rank, and the top candidates at that position."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass(eq=False)
class Request:
    """One sequence. A user request with ``n`` samples becomes ``n`` of these, sharing the prompt's blocks.

    ``num_computed_tokens`` is the single progress counter: the number of this sequence's tokens whose K/V
    are in the pool. Everything the scheduler does is letting it catch up with ``num_tokens``.
    """

    request_id: str  # unique per sequence: the user's id, plus "#i" for the i-th extra sample
    external_id: str  # the user's id, shared by all samples of one request
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    max_total_tokens: int  # prompt + output may not exceed this (max_tokens and max_model_len folded in)
    eos_token_id: int | None = None
    priority: int = 0  # lower is served first, as in vLLM
    sample_index: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    samples_to_fork: int = 0  # extra samples still to be split off once the prompt is computed
    arrival_seq: int = field(default_factory=lambda: next(_arrival_counter))
    lora_id: str | None = None  # the adapter whose weights produce this sequence's K/V (None: the base model)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks, filled lazily
    num_cached_tokens: int = 0  # while waiting: how many of its tokens the prefix cache holds (for lpm)
    spec_token_ids: list[int] = field(default_factory=list)  # proposals to verify in its next step

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def cache_extra_keys(self) -> tuple:
        """What besides the tokens changes this sequence's K/V, and so belongs in its block hashes."""
        return (self.lora_id,) if self.lora_id is not None else ()

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def check_stop(self) -> RequestStatus | None:
        """Stop conditions that need no text: stop/eos token ids and length. Stop strings live in the detokenizer."""
        last = self.output_token_ids[-1]
        if not self.params.ignore_eos and last == self.eos_token_id:
            self.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if last in self.params.stop_token_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if self.num_tokens >= self.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
