"""What crosses between the deployments: small, plain, cheap to pickle.

The ingress tokenizes and validates, so a worker receives token ids, never text, and sends back one
``StepItem`` per engine step holding only that step's new tokens and text (the engine's streaming deltas).
Items are named tuples of lists and floats rather than the engine's dataclasses: at 100 streams and ~50 steps/s
the worker pickles thousands of them a second, and the prompt (which ``RequestOutput`` repeats on every delta)
must not travel each time.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from gpt2serve.engine.outputs import RequestOutput
from gpt2serve.engine.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class LoRARef(NamedTuple):
    """One load of a LoRA adapter, as the scheduler's registry names it (``actors/lora_registry.py``). ``uid`` is
    new on every load and the same on every replica: the engines key their prefix caches by it, and a worker that
    lacks this load (it started later, or the adapter was unloaded after the request was admitted) loads it from
    ``path`` before running the request."""

    name: str
    uid: str
    path: str


@dataclass
class WorkRequest:
    """Ingress → worker: one prompt, already tokenized and validated."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    lora: LoRARef | None = None


@dataclass(eq=False)
class QueuedRequest:
    """Ingress → scheduler: what admission and routing need to know, without the prompt itself.

    It carries the attributes that ``policies.SchedulingPolicy.sort_key`` reads (``arrival_time``,
    ``arrival_seq``, ``priority``, ``num_tokens``, ``num_computed_tokens``), so the global queue is ordered by
    the very policy objects the engine uses.
    """

    request_id: str
    num_prompt_tokens: int
    max_new_tokens: int
    n: int = 1
    priority: int = 0
    # Hashes of the prompt's full KV blocks, chained as the engine keys its prefix cache (``prefix_index.
    # prompt_hashes``); set by the ingress when the routing policy reads them (prefix_aware), else empty.
    prefix_hashes: tuple[int, ...] = ()
    lora_name: str | None = None  # the adapter the request names (the scheduler answers 404 if none is loaded)
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_seq: int = field(default_factory=lambda: next(_arrival_counter))
    num_computed_tokens: int = 0  # nothing is computed while a request waits for a worker
    # Output tokens per sequence that admission reserves KV for (``admission.OutputLengths``): max_new_tokens,
    # or less when the service's recent requests stopped well before their max_tokens. Set by the dispatcher.
    reserve_new_tokens: int | None = None
    queued_at: float = 0.0  # when it joined the global queue, on the dispatcher's clock (for queue_timeout_s)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens

    @property
    def reserved_new_tokens(self) -> int:
        """The output tokens per sequence its KV reservation counts (max_new_tokens until the dispatcher sets less)."""
        return self.max_new_tokens if self.reserve_new_tokens is None else self.reserve_new_tokens


class Admission(NamedTuple):
    """Scheduler → ingress: the verdict on one ``QueuedRequest``."""

    worker_id: str | None  # the chosen model-worker replica (its Serve unique id); None when refused
    status: int = 200  # 429 queue full, 400 can never fit, 404 no such adapter, 503 no worker / waited too long
    message: str = ""
    retry_after_s: float | None = None
    lora: LoRARef | None = None  # the load of the adapter the request named, as of its admission


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class SeqDelta(NamedTuple):
    """One sequence's progress in one step: the new tokens and text only."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: int | str | None


class StepItem(NamedTuple):
    """Worker → ingress, once per engine step in which the request made progress."""

    seqs: list[SeqDelta]
    finished: bool


class WorkerError(NamedTuple):
    """Worker → ingress instead of a ``StepItem``: the engine refused (400) or failed (500) the request, or the
    replica failed it for its own trouble (503 with ``retry_after_s``: the request may succeed when sent again)."""

    message: str
    param: str | None
    status: int = 400
    retry_after_s: float | None = None


def retryable(message: str) -> WorkerError:
    """A request failed by its replica's trouble, not its own: 503 + Retry-After, which clients retry."""
    return WorkerError(f"{message}; retry the request", None, 503, 1.0)


class Refusal(NamedTuple):
    """Worker → ingress, answering ``submit``: not started. The ingress asks the scheduler for a worker again."""

    reason: str
    worker_gone: bool  # the replica the scheduler chose no longer exists: stop routing to it


def pack_output(out: RequestOutput) -> StepItem:
    seqs = []
    for c in out.outputs:
        logprobs = None
        if c.logprobs is not None:
            logprobs = [TokenLogprob(lp.token_id, lp.logprob, list(lp.top)) for lp in c.logprobs]
        seqs.append(SeqDelta(c.index, c.text, list(c.token_ids), logprobs, c.finish_reason, c.stop_reason))
    return StepItem(seqs, out.finished)
