"""End to end through Ray Serve's HTTP proxy: ingress → scheduler → model workers, with the tiny model.

Greedy outputs are compared with the offline engine (``engine.LLM``) on the same checkpoint and settings,
so a token lost, duplicated or reordered anywhere on the way shows up as a text mismatch.
"""

import asyncio
import json
import random
import time

import httpx
import pytest

from gpt2serve import LLM, SamplingParams
from tests.serve.conftest import CHANNEL_IDLE_S, MAX_QUEUED, MODEL_NAME, NUM_WORKERS, parse_sse, run, stream_events

# The first test also pays for starting Ray and Serve.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

PROMPTS = [
    "def main(", "import os\n", "class Parser:", "The quick brown fox", "return self.", "for i in range(",
    "if __name__ ==", "    def __init__(self", "# Copyright", "while True:", "try:\n    ", "x = [", "print(",
    "from collections import", "assert ", "lambda x:", "with open(", "yield ", "raise ValueError(", "@property\n",
]


@pytest.fixture(scope="module")
def offline(service):
    """Greedy reference continuations from the offline engine, by (prompt, max_tokens)."""
    llm = LLM(service.engine)
    cache: dict[tuple, str] = {}

    def reference(prompt, max_tokens: int, **params) -> str:
        key = (json.dumps(prompt), max_tokens, json.dumps(params, sort_keys=True))
        if key not in cache:
            sp = SamplingParams(temperature=0, max_tokens=max_tokens, **params)
            out = (llm.generate(prompt, sp) if isinstance(prompt, str)
                   else llm.generate(prompt_token_ids=[prompt], sampling_params=sp))[0]
            cache[key] = out.outputs[0].text
        return cache[key]

    return reference


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        yield c


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL_NAME, "temperature": 0, **body})


# ---------------------------------------------------------------------- basics
def test_health_and_models(client, service):
    assert client.get("/health").json() == {"status": "ok", "workers": NUM_WORKERS}
    snap = service.scheduler_snapshot()
    # The scheduler routes to exactly the replicas Serve's controller routes to.
    assert snap["routable"] == sorted(snap["workers"])
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert models["data"][0]["max_model_len"] == 512


def test_completion_matches_offline_engine(client, offline):
    r = complete(client, prompt="def main(", max_tokens=24)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == MODEL_NAME
    (choice,) = body["choices"]
    assert choice["text"] == offline("def main(", 24)
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 24
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 24


def test_streaming_completion_equals_non_streaming(service, offline):
    async def go():
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as c:
            return await stream_events(c, "/v1/completions", {
                "model": MODEL_NAME, "prompt": "class Parser:", "max_tokens": 20, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}})

    status, events = run(go())
    assert status == 200
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert len(chunks) >= 2, "tokens should arrive over several events, not all at the end"
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == offline("class Parser:", 20)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 20


def test_token_id_prompt_and_prompt_batch(client, offline):
    ids = [5, 17, 200, 33, 4]
    r = complete(client, prompt=ids, max_tokens=12)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == offline(ids, 12)
    assert r.json()["usage"]["prompt_tokens"] == len(ids)

    r = complete(client, prompt=["import os\n", "print("], max_tokens=10)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert texts == [offline("import os\n", 10), offline("print(", 10)]


def test_chat_completion(client, service):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages, "max_tokens": 16,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    # The plain chat template, continued by the offline engine, gives the same text.
    ref = LLM(service.engine).generate("system: You write Python.\nuser: a loop\nassistant:",
                                       SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    assert choice["message"]["content"] == ref
    assert body["usage"]["completion_tokens"] == 16


def test_streaming_chat(service, client):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12,
            "temperature": 0}
    full = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    async def go():
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as c:
            return await stream_events(c, "/v1/chat/completions", {
                **body, "stream": True, "stream_options": {"include_usage": True}})

    status, events = run(go())
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 12


def test_official_openai_client(service):
    import openai

    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    c = client.completions.create(model=MODEL_NAME, prompt="def main(", max_tokens=8, temperature=0)
    assert c.usage.completion_tokens == 8 and c.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True)
        if chunk.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL_NAME, prompt="def main(", max_tokens=8, temperature=0, stream=True))
    assert streamed == c.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, temperature=-1)


# ---------------------------------------------------------------------- sampling options
def test_completion_logprobs_legacy_format(client):
    r = complete(client, prompt="for i in range(", max_tokens=6, logprobs=3)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    for tok, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert top[tok] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the likeliest


def test_chat_logprobs_content_format(client):
    r = client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
        "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])


def test_n_seed_and_stop(client, offline):
    body = dict(prompt="x = [", max_tokens=16, temperature=1.0, n=3, seed=7)
    a, b = complete(client, **body).json(), complete(client, **body).json()
    assert sorted(c["index"] for c in a["choices"]) == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]], "seeded sampling must repeat"
    assert a["usage"]["completion_tokens"] == 48
    other = complete(client, **{**body, "seed": 8}).json()
    assert [c["text"] for c in other["choices"]] != [c["text"] for c in a["choices"]]

    full = offline("import os\n", 24)
    stop = full[5:8]
    r = complete(client, prompt="import os\n", max_tokens=24, stop=[stop]).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["stop_reason"] == stop
    assert r["text"] == full[:full.index(stop)]


def test_ignore_eos_top_k_top_p_priority_and_request_id(client):
    r = client.post("/v1/completions", headers={"X-Request-Id": "my-req-42"}, json={
        "model": MODEL_NAME, "prompt": "while True:", "max_tokens": 10, "temperature": 0.8, "top_k": 5,
        "top_p": 0.9, "ignore_eos": True, "priority": -3})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "cmpl-my-req-42"
    assert r.headers["x-request-id"] == "my-req-42"
    assert r.json()["usage"]["completion_tokens"] == 10


# ---------------------------------------------------------------------- concurrency
def test_twenty_concurrent_streams_match_offline(service, offline):
    max_tokens = 32

    async def one(c, prompt):
        return await stream_events(c, "/v1/completions", {
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})

    async def go():
        async with httpx.AsyncClient(base_url=service.base_url, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in PROMPTS))

    results = run(go())
    for prompt, (status, events) in zip(PROMPTS, results):
        assert status == 200, events
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-1])
        assert text == offline(prompt, max_tokens), prompt
    stats = service.wait_idle()
    assert sum(s["requests_finished"] for s in stats.values()) >= len(PROMPTS)
    assert all(s["requests_started"] > 0 for s in stats.values()), "both workers should have taken requests"
    assert all(s["requests_misrouted"] == 0 for s in stats.values())


def test_overload_gets_429_and_accepted_requests_complete(service):
    # 2 workers x 8 slots run 16 requests, 16 more may wait; a burst of 60 long ones must overflow.
    n_requests, max_tokens = 60, 200

    async def one(c, i):
        body = {"model": MODEL_NAME, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": i % 2 == 0}
        if body["stream"]:
            status, events = await stream_events(c, "/v1/completions", body)
            if status != 200:
                return status, None, events[0]
            tokens = sum(1 for e in events[:-1] if e["choices"] and e["choices"][0]["text"] is not None)
            return status, None, {"events": events, "tokens": tokens}
        r = await c.post("/v1/completions", json=body)
        return r.status_code, r.headers.get("retry-after"), r.json()

    async def go():
        limits = httpx.Limits(max_connections=n_requests)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n_requests)))

    results = run(go())
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in results if r[0] == 429]
    accepted = [r for r in results if r[0] == 200]
    assert rejected, "the burst should overflow the queue"
    assert len(accepted) >= NUM_WORKERS * 8 + MAX_QUEUED
    for status, retry_after, body in rejected:
        assert body["error"]["code"] == 429 and body["error"]["type"] == "RateLimitError"
        if retry_after is not None:  # non-streaming ones are read with their headers here
            assert int(retry_after) >= 1
    assert any(r[1] is not None for r in rejected), "a 429 must carry Retry-After"
    for status, _, body in accepted:
        if "events" in body:
            assert body["events"][-1] == "[DONE]"
            assert not any("error" in e for e in body["events"][:-1] if isinstance(e, dict))
        else:
            assert body["usage"]["completion_tokens"] == max_tokens
    service.wait_idle()


def test_client_disconnect_aborts_and_frees_blocks(service):
    before = service.wait_idle()
    cancelled_before = sum(s["requests_cancelled"] for s in before.values())
    body = {"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 450, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(6):  # a few tokens in: blocks are allocated
                next(lines)
            busy = service.worker_stats()
            assert any(s["num_free_blocks"] < s["num_total_blocks"] for s in busy.values())
        # leaving the block closes the connection mid-stream
    t0 = time.monotonic()
    after = service.wait_idle(timeout_s=10)
    assert time.monotonic() - t0 < 10
    assert sum(s["requests_cancelled"] for s in after.values()) == cancelled_before + 1
    assert all(s["num_free_blocks"] == s["num_total_blocks"] for s in after.values())


def test_the_client_that_opened_a_channel_can_leave_without_hurting_the_others(service):
    # Idle channels close; the next requests open them anew, inside their own HTTP requests. The channel must
    # not belong to the request that opened it: when that client leaves, the others keep streaming.
    deadline = time.monotonic() + CHANNEL_IDLE_S + 10
    while any(s["num_channels"] for s in service.worker_stats().values()):
        assert time.monotonic() < deadline, "idle channels should close"
        time.sleep(0.2)
    body = {"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
            "stream": True}

    async def go():
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as c:
            async def leaver():
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return  # gone after the first token

            openers = [asyncio.create_task(leaver()) for _ in range(NUM_WORKERS)]
            await asyncio.sleep(0.3)  # they are admitted first, so they open the channels
            stayers = [asyncio.create_task(stream_events(c, "/v1/completions", body)) for _ in range(NUM_WORKERS)]
            await asyncio.gather(*openers)
            return await asyncio.gather(*stayers)

    for status, events in run(go()):
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        assert sum(1 for e in events[:-1] if e["choices"]) == 120
    stats = service.wait_idle()
    assert all(s["requests_misrouted"] == 0 for s in stats.values())


# ---------------------------------------------------------------------- errors
LONG_TEXT = "word " * 600  # far more than the tiny model's 512-token context

ERROR_CASES = [
    # (name, path, raw body or json, status, param)
    ("malformed json", "/v1/completions", b'{"model": "tiny-gpt2", "prompt": ', 400, None),
    ("not an object", "/v1/completions", b'[1, 2]', 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("unknown chat model", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
     404, "model"),
    ("context overflow", "/v1/completions", {"prompt": "def main(", "max_tokens": 510}, 400, "max_tokens"),
    ("prompt too long", "/v1/completions", {"prompt": LONG_TEXT, "max_tokens": 1}, 400, "prompt"),
    ("chat too long", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "messages"),
    ("negative temperature", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("temperature not a number", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("n zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("n too large", "/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("max_tokens zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty token list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("negative token id", "/v1/completions", {"prompt": [1, -4]}, 400, "prompt"),
    ("too many logprobs", "/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("streaming overflow", "/v1/completions", {"prompt": "x", "max_tokens": 600, "stream": True}, 400, "max_tokens"),
]


@pytest.mark.parametrize("name,path,body,status,param", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_are_openai_shaped_4xx(client, name, path, body, status, param):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json={"model": MODEL_NAME, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err


def test_service_keeps_serving_after_errors(client, offline, service):
    for _, path, body, _, _ in ERROR_CASES[:6]:
        client.post(path, **({"content": body} if isinstance(body, bytes) else {"json": body}))
    r = complete(client, prompt="def main(", max_tokens=24)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline("def main(", 24)
    service.wait_idle()


def test_metrics_exposes_engine_and_request_stats(client):
    complete(client, prompt="print(", max_tokens=4)
    text = client.get("/metrics").text
    for name in ("gpt2serve:num_requests_running{", "gpt2serve:num_requests_waiting{", "gpt2serve:kv_cache_usage_perc{",
                 "gpt2serve:kv_cache_free_blocks{", "gpt2serve:scheduler_queue_length ", "gpt2serve:num_workers ",
                 "gpt2serve:time_to_first_token_seconds_bucket", "gpt2serve:requests_total{status=\"200\"}"):
        assert name in text, name
    assert text.count("gpt2serve:kv_cache_total_blocks{") == NUM_WORKERS


def test_sse_parser_rejects_garbage():
    with pytest.raises(AssertionError):
        parse_sse(["garbage"])
    assert parse_sse(['data: {"a": 1}', "", "data: [DONE]"]) == [{"a": 1}, "[DONE]"]


def test_random_token_prompts_fit_the_load_generator_format(client):
    # The W4 benchmark sends token-id prompts with ignore_eos; the service must return exactly max_tokens.
    rng = random.Random(0)
    prompt = [rng.randrange(500) for _ in range(64)]
    r = complete(client, prompt=prompt, max_tokens=16, ignore_eos=True, stream=False)
    assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 64, "completion_tokens": 16,
                                                          "total_tokens": 80}
