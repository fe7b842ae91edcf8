"""The OpenAI wire format pieces and the pinned router's choice, without Ray Serve running."""

import time
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from gpt2serve.actors import openai_api as oa
from gpt2serve.actors.protocol import TokenLogprob
from gpt2serve.actors.replica_router import PinnedReplicaRouter
from gpt2serve.actors.settings import RequestLimits
from gpt2serve.engine.errors import InvalidRequestError


class Chars:
    """A tokenizer whose token i is chr(ord('a') + i)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_prompt_shapes():
    assert oa.CompletionRequest(prompt="hi").prompts() == ["hi"]
    assert oa.CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert oa.CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert oa.CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    for bad in (1.5, [1.5], [[1, "x"]], None):
        with pytest.raises(ValidationError):
            oa.CompletionRequest(prompt=bad)


def test_unknown_fields_are_ignored_and_extensions_reach_sampling():
    req = oa.CompletionRequest(prompt="x", frobnicate=True, top_k=5, ignore_eos=True, stop="\n", priority=-2,
                               stop_token_ids=[7], temperature=None)
    p = req.sampling_params(max_tokens=3, logprobs=2)
    assert (p.top_k, p.ignore_eos, p.stop, p.stop_token_ids, p.temperature, p.logprobs) == (
        5, True, ["\n"], [7], 1.0, 2)
    assert req.priority == -2


def test_bad_sampling_values_name_their_field():
    for field, value in (("temperature", -1), ("top_p", 0), ("n", 0), ("presence_penalty", 3)):
        with pytest.raises(InvalidRequestError) as e:
            oa.CompletionRequest(prompt="x", **{field: value}).sampling_params(4, None)
        assert e.value.param == field


LIMITS = RequestLimits(max_stop=2, max_stop_length=4, max_stop_token_ids=3, max_batch_sequences=4, max_logprobs=5,
                       max_messages=2)


def refused(req) -> oa.APIError:
    with pytest.raises(oa.APIError) as e:
        req.check(LIMITS)
    assert e.value.status == 400
    return e.value


def test_unimplemented_fields_are_refused_by_name_unless_they_change_nothing():
    e = refused(oa.CompletionRequest(prompt="x", logit_bias={"1": 5}, tools=[{"type": "function"}], min_tokens=3))
    assert e.param == "logit_bias" and all(f in e.message for f in ("logit_bias", "tools", "min_tokens"))
    assert refused(oa.CompletionRequest(prompt="x", best_of=3)).param == "best_of"
    chat = [{"role": "user", "content": "x"}]
    assert refused(oa.ChatCompletionRequest(messages=chat, response_format={"type": "json_object"})).param == (
        "response_format")
    for noop in ({"echo": False}, {"response_format": {"type": "text"}}, {"tools": []}, {"min_tokens": 0},
                 {"best_of": 1}, {"frobnicate": 1}, {"logit_bias": None}):
        oa.CompletionRequest(prompt="x", **noop).check(LIMITS)


def test_limits_name_their_field():
    cases = [(dict(prompt="x", stop=["a", "b", "c"]), "stop"), (dict(prompt="x", stop="abcde"), "stop"),
             (dict(prompt="x", stop_token_ids=[1, 2, 3, 4]), "stop_token_ids"),
             (dict(prompt=["a", "b", "c"], n=2), "prompt"), (dict(prompt="x", logprobs=6), "logprobs")]
    for fields, param in cases:
        assert refused(oa.CompletionRequest(**fields)).param == param
    chat = [{"role": "user", "content": "x"}]
    assert refused(oa.ChatCompletionRequest(messages=chat * 3)).param == "messages"
    assert refused(oa.ChatCompletionRequest(messages=chat, logprobs=True, top_logprobs=6)).param == "top_logprobs"
    assert refused(oa.ChatCompletionRequest(messages=chat, top_logprobs=2)).param == "top_logprobs"
    oa.CompletionRequest(prompt=["a", "b"], n=2, stop=["ab", "cd"], stop_token_ids=[1, 2, 3], logprobs=5).check(LIMITS)


@pytest.mark.parametrize("body", [
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", b'{"prompt": "x", "temperature": Infinity}',
    b'{"prompt": "x", "top_p": NaN}', b'{"prompt": "\\ud800"}', b'{"prompt": "x", "seed": 18446744073709551616}',
    b'{"prompt": "x", "priority": 2147483648}', b'{"prompt": [1, 2147483648]}', b'{"prompt": "x", "stop": ' +
    b"[" * 300 + b"]" * 300 + b"}", b'{"prompt": "x", "temperature": 1e400}', b'{"prompt": "\xed\xa0\x80"}',
    b'{"prompt": "x", "timeout": 0}', b'{"prompt": "x", "timeout": -5}', b'{"prompt": "x", "timeout": Infinity}',
    b'{"prompt": "x", "timeout": ' + b"9" * 5000 + b"}", b'{"prompt": "x", "timeout": "soon"}'])
def test_hostile_numbers_and_strings_fail_at_parse_time(body):
    with pytest.raises(ValidationError):
        oa.CompletionRequest.model_validate_json(body)


def test_chat_template_and_content_parts():
    msgs = [oa.ChatMessage(role="system", content="Be brief."),
            oa.ChatMessage(role="user", content=[{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}])]
    assert oa.render_chat(msgs) == "system: Be brief.\nuser: Hi there\nassistant:"
    with pytest.raises(ValidationError):
        oa.ChatCompletionRequest(messages=[])


def test_completion_logprobs_continue_offsets_across_chunks():
    text = oa.TokenText(Chars())
    first, offset = oa.completion_logprobs([TokenLogprob(0, -0.1, [(0, -0.1), (1, -2.0)])], text, 0)
    second, offset = oa.completion_logprobs([TokenLogprob(2, -0.5, [(1, -0.4)])], text, offset)
    assert first == {"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1, "b": -2.0}],
                     "text_offset": [0]}
    # The chosen token is listed even when it is not among the top candidates.
    assert second["top_logprobs"] == [{"b": -0.4, "c": -0.5}] and second["text_offset"] == [1]
    assert offset == 2


def test_chat_logprobs_format():
    out = oa.chat_logprobs([TokenLogprob(1, -0.3, [(1, -0.3), (4, -1.0), (5, -2.0)])], oa.TokenText(Chars()), 2)
    assert out == {"content": [{"token": "b", "logprob": -0.3, "bytes": [98], "top_logprobs": [
        {"token": "b", "logprob": -0.3, "bytes": [98]}, {"token": "e", "logprob": -1.0, "bytes": [101]}]}]}


def test_error_body_shape():
    e = oa.APIError(429, "busy", retry_after_s=2.0)
    assert e.body() == {"error": {"message": "busy", "type": "RateLimitError", "param": None, "code": 429}}


# ---------------------------------------------------------------------- pinned router
def replica(uid):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid))


def pending(target, age_s=0.0):
    return SimpleNamespace(kwargs={"replica": target} if target else {}, created_at=time.time() - age_s,
                           routing_context=SimpleNamespace(should_backoff=False))


def choose(candidates, request, pin_wait_s=1.0):
    import asyncio

    router = SimpleNamespace(pin_wait_s=pin_wait_s)
    return asyncio.run(PinnedReplicaRouter.choose_replicas(router, candidates, request))


def test_router_sends_a_pinned_call_to_its_replica_only():
    a, b = replica("a"), replica("b")
    req = pending("b")
    assert choose([a, b], req) == [[b]]
    assert req.routing_context.should_backoff  # a full replica is retried with backoff, not in a tight loop


def test_router_waits_for_an_unknown_replica_then_lets_any_take_it():
    a, b = replica("a"), replica("b")
    assert choose([a, b], pending("new")) == []  # not known to this handle yet: wait
    assert choose([a, b], pending("gone", age_s=2.0)) == [[a, b]]  # the one that gets it refuses it


def test_unpinned_calls_go_anywhere():
    a, b = replica("a"), replica("b")
    assert choose([a, b], pending(None)) == [[a, b]]
