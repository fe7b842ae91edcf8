"""The OpenAI wire format: request models (pydantic), error bodies, and the response pieces the ingress assembles.

Request models keep fields they do not know (as vLLM ignores them), so that clients sending newer fields keep
working; fields that would change the result and are not implemented (``UNSUPPORTED``) are refused by name
instead of silently dropped, unless they carry the value that changes nothing. Numbers are bounded at parse
time (finite floats, 32- or 64-bit integers); the engine's ``SamplingParams`` checks what they mean.
``check(limits)`` applies the service's per-request limits (``settings.RequestLimits``).
Extensions, named as in vLLM: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``,
``priority`` (lower is served first); ``timeout``: seconds the whole request may take (the service's
``request_timeout_s`` by default, at most ``max_request_timeout_s``), named after the OpenAI client's own
``timeout`` argument, which does not reach the server: send it with ``extra_body={"timeout": 30}``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from gpt2serve.actors.protocol import SeqDelta, TokenLogprob
from gpt2serve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from gpt2serve.actors.settings import RequestLimits

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 408: "RequestTimeoutError", 413: "RequestTooLargeError",
               415: "UnsupportedMediaTypeError", 429: "RateLimitError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class APIError(Exception):
    """Anything the ingress answers with an OpenAI error body instead of a result. ``type_`` and ``code``
    replace the defaults (the status's name and number) where OpenAI's own body says otherwise (401)."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after_s: float | None = None,
                 type_: str | None = None, code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after_s = status, message, param, retry_after_s
        self.type, self.code = type_ or ERROR_TYPES.get(status, "APIError"), status if code is None else code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------- requests
# Bounds that keep every number representable where it goes (tensors, torch generators, heaps), so that a
# 5,000-digit integer or Infinity is a 400 at parse time; what a value means is SamplingParams' to check.
Float = Annotated[float, Field(allow_inf_nan=False)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]  # the vocabulary check comes after tokenizing
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed takes
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Request(BaseModel):
    def check(self, limits: RequestLimits) -> None:
        """Raise APIError (400, naming the field) if the request exceeds the service's limits."""


# Fields of OpenAI's or vLLM's API that this service does not implement: name -> the values that change nothing
# (a client library sending its default is served). Any other value is refused with a 400 naming the field.
UNSUPPORTED: dict[str, tuple] = {
    "echo": (False,), "suffix": ("",), "logit_bias": ({},), "response_format": ({"type": "text"},),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "min_tokens": (0,), "prompt_logprobs": (), "use_beam_search": (False,), "length_penalty": (1, 1.0),
    "include_stop_str_in_output": (False,), "allowed_token_ids": (), "bad_words": ([],),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
    "logits_processors": ([],), "truncate_prompt_tokens": (), "audio": (), "modalities": (["text"],),
    "prediction": (), "web_search_options": (), "reasoning_effort": (), "chat_template": (),
    "chat_template_kwargs": ({},), "add_generation_prompt": (True,), "continue_final_message": (False,),
    "documents": ([],), "mm_processor_kwargs": ({},),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(_Request):
    model_config = ConfigDict(extra="allow")  # kept, so that unsupported ones can be named (``check``)

    model: str | None = None
    max_tokens: Count | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    n: Count = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    user: str | None = None
    # extensions
    top_k: Int32 = 0
    min_p: Float = 0.0
    repetition_penalty: Float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    priority: Int32 = 0
    timeout: Seconds | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises engine.errors.InvalidRequestError naming the bad field."""
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
            stop=self.stops(), stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> list[str]:
        """The fields this request sets that the service does not implement (see ``UNSUPPORTED``)."""
        return [k for k, v in (self.model_extra or {}).items()
                if k in UNSUPPORTED and v is not None and v not in UNSUPPORTED[k]]

    def check(self, limits: RequestLimits) -> None:
        refused = self.unsupported()
        if refused:
            raise APIError(400, f"not supported by this service: {', '.join(refused)} (leave "
                           f"{'it' if len(refused) == 1 else 'them'} out)", refused[0])
        stops = self.stops()
        _at_most(len(stops), limits.max_stop, "stop", "stop strings")
        _at_most(max(map(len, stops), default=0), limits.max_stop_length, "stop", "characters in a stop string")
        _at_most(len(self.stop_token_ids or ()), limits.max_stop_token_ids, "stop_token_ids", "stop_token_ids")


def _at_most(value: int, limit: int, param: str, what: str) -> None:
    if value > limit:
        raise APIError(400, f"at most {limit} {what} per request, got {value}", param)



class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[TokenId] | list[StrictStr] | list[list[TokenId]]
    max_tokens: Count | None = 16  # OpenAI's default for completions
    logprobs: Count | None = None
    best_of: Count | None = None

    def prompts(self) -> list[str | list[int]]:
        """One request may carry a batch of prompts; a bare list of ints is one tokenized prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], (str, list)):
            return list(p)
        return [list(p)]

    def check(self, limits: RequestLimits) -> None:
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported by this service (leave it out, or equal to n)", "best_of")
        super().check(limits)
        prompts = len(self.prompts())
        _at_most(prompts * self.n, limits.max_batch_sequences, "prompt" if prompts > 1 else "n",
                 "sequences (prompts × n)")
        _at_most(self.logprobs or 0, limits.max_logprobs, "logprobs", "logprobs")


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ChatContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Count | None = None

    def check(self, limits: RequestLimits) -> None:
        super().check(limits)
        _at_most(len(self.messages), limits.max_messages, "messages", "messages")
        _at_most(self.top_logprobs or 0, limits.max_logprobs, "top_logprobs", "top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")


def render_chat(messages: list[ChatMessage]) -> str:
    """GPT-2 has no chat format: one "role: content" line per message, then "assistant:" to answer."""
    lines = [f"{m.role}: {m.text()}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


# ---------------------------------------------------------------------- responses
def now_s() -> int:
    return int(time.time())


class LoadLoRAAdapterRequest(_Request):
    """``POST /v1/load_lora_adapter``, as vLLM names it."""

    lora_name: StrictStr = Field(min_length=1)
    lora_path: StrictStr = Field(min_length=1)


class UnloadLoRAAdapterRequest(_Request):
    """``POST /v1/unload_lora_adapter``; vLLM's optional ``lora_int_id`` is accepted and ignored (names are unique)."""

    lora_name: StrictStr = Field(min_length=1)
    lora_int_id: Int32 | None = None


class TokenText:
    """Token id → its text, memoised (logprobs name every token, and the same ids recur constantly)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


def completion_logprobs(lps: list[TokenLogprob], token_text: TokenText, offset: int) -> tuple[dict, int]:
    """The legacy completions format (tokens / token_logprobs / top_logprobs / text_offset); returns the offset
    after these tokens, so that streamed chunks continue where the last one stopped."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in lps:
        text = token_text(lp.token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top = {token_text(tid): v for tid, v in lp.top}
        top.setdefault(text, lp.logprob)  # the chosen token is always listed, as vLLM does
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(lps: list[TokenLogprob], token_text: TokenText, top_n: int) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:top_n]]}
                        for lp in lps]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Choice:
    """One output sequence as the client sees it, accumulated from deltas (non-streaming responses)."""

    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.num_tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def add(self, delta: SeqDelta) -> None:
        self.text.append(delta.text)
        self.num_tokens += len(delta.token_ids)
        if delta.logprobs:
            self.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
