"""Turns per-sequence token progress into RequestOutputs: incremental detokenization and stop strings.

Stop strings need text, so they are found here rather than in the scheduler; the engine then ends those
sequences in the scheduler. While streaming, the last ``len(longest stop string) - 1`` characters are held
back, so that a client never sees the beginning of a stop string that the next token completes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gpt2serve.engine.outputs import CompletionOutput, EngineCoreOutput, RequestOutput
from gpt2serve.engine.request import TokenLogprobs
from gpt2serve.engine.sampling_params import SamplingParams


@dataclass
class SequenceText:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    sent_tokens: int = 0
    sent_chars: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    arrival_time: float
    seqs: list[SequenceText]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        if len(self.seqs) == 1:  # the usual case, read per request per step
            return self.seqs[0].finish_reason is not None
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, state: RequestState) -> None:
        self.states[state.request_id] = state

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark a request aborted and return its closing output (None if it was not in flight)."""
        state = self.states.get(request_id)
        if state is None:
            return None
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        return self._emit(state, time.monotonic())

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the request outputs of this step and the sequences that hit a stop string."""
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        for out in outputs:
            state = self.states.get(out.external_id)
            if state is None:
                continue
            seq = state.seqs[out.sample_index]
            if seq.finish_reason is not None:
                continue
            if out.prompt_logprobs is not None:
                state.prompt_logprobs = out.prompt_logprobs
            if out.new_token_ids and state.first_token_time is None:
                state.first_token_time = now
            seq.token_ids += out.new_token_ids
            if out.new_logprobs:
                seq.logprobs += out.new_logprobs
            if state.params.detokenize and self._detokenize(seq, state.params):
                stopped.append(out.req_id)
            elif out.finish_reason is not None:
                seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
            touched[state.request_id] = state
        results = [r for state in touched.values() if (r := self._emit(state, now)) is not None]
        return results, stopped

    def _detokenize(self, seq: SequenceText, params: SamplingParams) -> bool:
        """Extend ``seq.text`` with the new tokens; True when a stop string ended the sequence."""
        ids = seq.token_ids
        if ids and (ids[-1] in params.stop_token_ids
                    or (ids[-1] == self.tokenizer.eos_token_id and not params.ignore_eos)):
            ids = ids[:-1]  # the token that stopped the sequence is not part of its text
        # Decode a short window: the text of tokens [prefix, read) is already in seq.text, so decoding
        # [prefix, end) and dropping that part yields the new text, with merges across the boundary right.
        before = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset])
        after = self.tokenizer.decode(ids[seq.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # not in the middle of a UTF-8 char
            new_text = after[len(before):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            start = max(len(seq.text) - max((len(s) for s in params.stop), default=0), 0)
            seq.text += new_text
            for stop in params.stop:
                at = seq.text.find(stop, start)
                if at >= 0:
                    seq.text = seq.text[:at]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return True
        return False

    def _emit(self, state: RequestState, now: float) -> RequestOutput | None:
        finished = state.finished
        if not state.stream and not finished:
            return None
        hold = max((len(s) for s in state.params.stop), default=1) - 1
        outputs = []
        for seq in state.seqs:
            end = len(seq.text) if seq.finish_reason is not None else max(len(seq.text) - hold, seq.sent_chars)
            if state.stream:
                tokens, logprobs = seq.token_ids[seq.sent_tokens:], seq.logprobs[seq.sent_tokens:]
                text = seq.text[seq.sent_chars:end]
                if not tokens and not text and seq.finish_reason is None:
                    continue
            else:
                tokens, logprobs, text = seq.token_ids, seq.logprobs, seq.text
            seq.sent_tokens, seq.sent_chars = len(seq.token_ids), end
            want_lp = state.params.logprobs is not None
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(tokens),
                cumulative_logprob=sum(lp.logprob for lp in seq.logprobs) if want_lp else None,
                logprobs=list(logprobs) if want_lp else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            ))
        prompt_logprobs = None
        if state.prompt_logprobs is not None and not state.prompt_logprobs_sent:
            prompt_logprobs, state.prompt_logprobs_sent = state.prompt_logprobs, True
        if finished:
            self.states.pop(state.request_id, None)
        if not outputs and prompt_logprobs is None and not finished:
            return None
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_logprobs, outputs=outputs, finished=finished,
            metrics={
                "arrival_time": state.arrival_time, "first_token_time": state.first_token_time,
                "finished_time": now if finished else None,
                "num_prompt_tokens": len(state.prompt_token_ids),
                "num_generated_tokens": sum(len(s.token_ids) for s in state.seqs),
            },
        )
