"""The OpenAI wire format: request models (pydantic), error bodies, and the response pieces the ingress assembles.

Request models ignore fields they do not know (as vLLM does), so that clients sending newer fields keep working;
fields that would change the result and are not implemented are refused instead of silently dropped.
Extensions, named as in vLLM: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``,
``priority`` (lower is served first).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from gpt2serve.actors.protocol import SeqDelta, TokenLogprob
from gpt2serve.engine.sampling_params import SamplingParams

ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class APIError(Exception):
    """Anything the ingress answers with an OpenAI error body instead of a result."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after_s = status, message, param, retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}


# ---------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    priority: int = 0

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises engine.errors.InvalidRequestError naming the bad field."""
        if self.logit_bias:
            from gpt2serve.engine.errors import InvalidRequestError

            raise InvalidRequestError("logit_bias is not supported", "logit_bias")
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """One request may carry a batch of prompts; a bare list of ints is one tokenized prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], (str, list)):
            return list(p)
        return [list(p)]


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
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def render_chat(messages: list[ChatMessage]) -> str:
    """GPT-2 has no chat format: one "role: content" line per message, then "assistant:" to answer."""
    lines = [f"{m.role}: {m.text()}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


# ---------------------------------------------------------------------- responses
def now_s() -> int:
    return int(time.time())


class LoadLoRAAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter``, as vLLM names it."""

    lora_name: StrictStr = Field(min_length=1)
    lora_path: StrictStr = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``; vLLM's optional ``lora_int_id`` is accepted and ignored (names are unique)."""

    lora_name: StrictStr = Field(min_length=1)
    lora_int_id: int | None = None


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
