"""Hostile and careless clients against the real Ray Serve app (issue 22): property-based bodies (hypothesis)
and a list of known-bad ones always get a 2xx or a 4xx with an OpenAI error body, never a 500; the service keeps
serving and every pool is free again. Nothing runs for nobody: a batch refused with 429 leaves no sibling
behind, and a client that hangs up while queued leaves the queue. API keys, on an application of their own.
"""

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import MAX_QUEUED, MODEL_NAME, NUM_WORKERS, parse_sse, run, side_app

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
CHAT = [{"role": "user", "content": "hi"}]


def assert_answer(r: httpx.Response, body: bytes) -> None:
    """2xx with a result, or 4xx with an OpenAI error body; a stream's error event is never a 500 either."""
    assert r.status_code < 500, (r.status_code, body[:300], r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = parse_sse(r.text.splitlines())
        assert events[-1] == "[DONE]"
        assert all(e["error"]["code"] < 500 for e in events[:-1] if "error" in e), events[-2:]
    else:
        assert r.json()["choices"], r.text


def post(client: httpx.Client, path: str, body: bytes, content_type: str = "application/json", **headers):
    r = client.post(path, content=body, headers={"content-type": content_type, **headers})
    assert_answer(r, body)
    return r


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        yield c


# ---------------------------------------------------------------------- the hostile list
def completion(**fields) -> bytes:
    return json.dumps({"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, **fields}).encode()


def chat(**fields) -> bytes:
    return json.dumps({"model": MODEL_NAME, "messages": CHAT, "max_tokens": 2, **fields}).encode()


HOSTILE = [  # (name, path, body, content type, status)
    ("lone surrogate", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', None, 400),
    ("lone surrogate in chat", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}]}', None, 400),
    ("raw surrogate bytes", "/v1/completions", b'{"prompt": "\xed\xa0\x80"}', None, 400),
    ("invalid utf-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', None, 400),
    ("5,000-digit max_tokens", "/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None, 400),
    ("5,000-digit seed", "/v1/completions", b'{"prompt": "x", "seed": -' + b"9" * 5000 + b"}", None, 400),
    ("5,000-digit token id", "/v1/completions", b'{"prompt": [' + b"7" * 5000 + b"]}", None, 400),
    ("huge float as n", "/v1/completions", b'{"prompt": "x", "n": 1e308}', None, 400),
    ("Infinity", "/v1/completions", b'{"prompt": "x", "temperature": Infinity}', None, 400),
    ("NaN", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', None, 400),
    ("1e400", "/v1/completions", b'{"prompt": "x", "presence_penalty": -1e400}', None, 400),
    ("deep nesting", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, 400),
    ("deep nesting in an unknown field", "/v1/completions",
     b'{"prompt": "x", "extra": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", None, 400),
    ("not an object", "/v1/chat/completions", b'"hello"', None, 400),
    ("null", "/v1/completions", b"null", None, 400),
    ("empty body", "/v1/completions", b"", None, 400),
    ("text/plain", "/v1/completions", completion(), "text/plain", 415),
    ("a cross-site form", "/v1/completions", b"prompt=x", "application/x-www-form-urlencoded", 415),
    ("no content type", "/v1/chat/completions", chat(), "", 415),
    ("multipart", "/v1/completions", b"--x--", "multipart/form-data; boundary=x", 415),
    ("over max_request_body_bytes", "/v1/completions", completion(prompt="x" * (3 << 20)), None, 413),
    ("10,000 stop strings", "/v1/completions", completion(stop=[f"s{i}" for i in range(10_000)]), None, 400),
    ("a 100,000-character stop string", "/v1/completions", completion(stop="s" * 100_000), None, 400),
    ("100,000 stop_token_ids", "/v1/completions", completion(stop_token_ids=list(range(100_000))), None, 400),
    ("200 prompts", "/v1/completions", completion(prompt=["x"] * 200), None, 400),
    ("prompts × n", "/v1/completions", completion(prompt=["x"] * 16, n=16), None, 400),
    ("logprobs 10,000", "/v1/completions", completion(logprobs=10_000), None, 400),
    ("top_logprobs 10,000", "/v1/chat/completions", chat(logprobs=True, top_logprobs=10_000), None, 400),
    ("10,000 messages", "/v1/chat/completions", chat(messages=CHAT * 10_000), None, 400),
    ("response_format", "/v1/chat/completions", chat(response_format={"type": "json_object"}), None, 400),
    ("tools", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400),
    ("min_tokens", "/v1/completions", completion(min_tokens=4), None, 400),
    ("logit_bias", "/v1/completions", completion(logit_bias={"50256": -100}), None, 400),
    ("echo", "/v1/completions", completion(echo=True), None, 400),
    ("seed past 64 bits", "/v1/completions", completion(seed=2**64), None, 400),
    ("priority past 32 bits", "/v1/completions", completion(priority=-(2**40)), None, 400),
    ("stop_token_ids out of range", "/v1/completions", completion(stop_token_ids=[2**40]), None, 400),
    ("runtime LoRA loading is off", "/v1/load_lora_adapter",
     json.dumps({"lora_name": "a", "lora_path": "/etc"}).encode(), None, 404),
    ("runtime LoRA unloading is off", "/v1/unload_lora_adapter", json.dumps({"lora_name": "a"}).encode(), None, 404),
]


@pytest.mark.parametrize("name,path,body,content_type,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_a_4xx_naming_the_problem(client, name, path, body, content_type, status):
    r = post(client, path, body, "application/json" if content_type is None else content_type)
    assert r.status_code == status, r.text[:500]


def test_hostile_headers_and_bodies_without_a_length(client, service):
    assert post(client, "/v1/completions", completion(), **{"X-Request-Id": "r" * 10_000}).status_code == 400
    assert post(client, "/v1/completions", completion(), **{"X-Request-Id": "a\tb"}).status_code == 400

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * (100 << 10)
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    service.wait_idle()
    assert client.post("/v1/completions", json={"prompt": "def main(", "max_tokens": 4}).status_code == 200


# ---------------------------------------------------------------------- property-based bodies
HUGE = st.sampled_from([10**30, -(10**30), 2**31, 2**63, 2**64, float("inf"), float("-inf"), float("nan"), 1e308])
ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                   lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                   max_leaves=6)
TEXT = st.text(max_size=30) | st.sampled_from(["\ud800", "\x00", "<|endoftext|>", "é" * 50])
SMALL = st.integers(-3, 12)
FLOAT = st.floats(-3, 3) | HUGE
COMMON = {
    "model": st.sampled_from([MODEL_NAME, "nope", ""]) | ANY,
    "max_tokens": SMALL | HUGE | ANY, "temperature": FLOAT | ANY, "top_p": FLOAT, "top_k": SMALL | HUGE,
    "min_p": FLOAT, "n": st.integers(-1, 4) | HUGE, "seed": st.integers() | HUGE, "stream": st.booleans() | ANY,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | ANY,
    "stop": TEXT | st.lists(TEXT, max_size=4) | ANY, "stop_token_ids": st.lists(st.integers(-2, 60000), max_size=4),
    "presence_penalty": FLOAT, "frequency_penalty": FLOAT, "repetition_penalty": FLOAT,
    "ignore_eos": st.booleans(), "priority": st.integers() | HUGE, "logit_bias": ANY, "user": ANY,
    "response_format": ANY, "tools": ANY, "min_tokens": ANY, "frobnicate": ANY,
}
TOKENS = st.lists(st.integers(-2, 60000), max_size=6)
PROMPT = TEXT | TOKENS | st.lists(TEXT, max_size=3) | st.lists(TOKENS, max_size=3) | ANY
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "wizard"]) | ANY},
                                optional={"content": TEXT | st.lists(st.fixed_dictionaries(
                                    {"type": st.just("text") | ANY, "text": TEXT}), max_size=3) | ANY})


# Valid values too, so that the fuzz also reaches admission, the workers and both response paths.
VALID = {
    "model": st.just(MODEL_NAME), "max_tokens": st.integers(1, 12), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1), "n": st.integers(1, 3),
    "seed": st.integers(0, 2**64 - 1), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 500), max_size=3), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2), "ignore_eos": st.booleans(),
    "priority": st.integers(-10, 10), "user": st.text(max_size=5), "response_format": st.just({"type": "text"}),
    "tools": st.just([]), "frobnicate": ANY,
}
VALID_PROMPT = (st.text(min_size=1, max_size=20) | st.lists(st.integers(0, 255), min_size=1, max_size=6)
                | st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3))
VALID_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                 "content": st.text(max_size=20)}), min_size=1, max_size=3)


def bodies(required: dict, extra: dict, valid_required: dict, valid_extra: dict):
    return (st.fixed_dictionaries(valid_required, optional={**VALID, **valid_extra})
            | st.fixed_dictionaries(required, optional={**COMMON, **extra}) | ANY)


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def test_fuzzed_bodies_get_2xx_or_4xx_and_the_service_keeps_serving(client, service):
    statuses = {"/v1/completions": [], "/v1/chat/completions": []}

    @FUZZ
    @given(bodies({"prompt": PROMPT}, {"logprobs": SMALL | HUGE | ANY, "best_of": SMALL, "echo": ANY, "suffix": ANY},
                  {"prompt": VALID_PROMPT}, {"logprobs": st.integers(0, 5)}))
    def completions(body):
        statuses["/v1/completions"].append(post(client, "/v1/completions", json.dumps(body).encode()).status_code)

    @FUZZ
    @given(bodies({"messages": st.lists(MESSAGE, max_size=3) | ANY},
                  {"logprobs": st.booleans() | ANY, "top_logprobs": SMALL | HUGE,
                   "max_completion_tokens": SMALL | HUGE},
                  {"messages": VALID_MESSAGES}, {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)}))
    def chats(body):
        path = "/v1/chat/completions"
        statuses[path].append(post(client, path, json.dumps(body).encode()).status_code)

    completions()
    chats()
    for path, seen in statuses.items():  # both the success path and the refusals were exercised
        assert sum(s == 200 for s in seen) >= 5 and sum(s >= 400 for s in seen) >= 5, (path, seen)
    service.wait_idle()
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


# ---------------------------------------------------------------------- nothing runs for nobody
def started(service) -> dict[str, int]:
    return {wid: s["requests_started"] for wid, s in service.worker_stats().items()}


def test_a_batch_refused_with_429_leaves_no_orphan(service, client):
    """2 workers × 8 slots run 16 prompts and 16 more may wait: the batch's 33rd prompt gets 429. Before the
    fix its admitted and queued siblings ran to the end with nobody reading; now none starts after the 429."""
    service.wait_idle()
    prompts = [f"def f{i}(" for i in range(NUM_WORKERS * 8 + MAX_QUEUED + 20)]
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompts, "max_tokens": 200,
                                             "ignore_eos": True})
    assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError", r.text
    after_429 = started(service)
    time.sleep(2.0)  # long enough for a queued sibling to be admitted as the running ones end
    assert started(service) == after_429
    snap = service.scheduler_snapshot()
    assert snap["num_waiting"] == 0
    service.wait_idle()


def test_a_request_leaves_the_queue_when_its_client_hangs_up_or_its_deadline_passes(service):
    service.wait_idle()
    cancelled_before = service.scheduler_snapshot()["counters"]["cancelled_waiting"]
    long = {"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 450, "ignore_eos": True, "stream": True}

    async def hold(c, ready: asyncio.Event):
        async with c.stream("POST", "/v1/completions", json=long) as r:
            assert r.status_code == 200
            ready.set()
            await asyncio.Event().wait()  # until cancelled: then the connection closes

    async def go():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60, limits=limits) as c:
            readies = [asyncio.Event() for _ in range(NUM_WORKERS * 8)]
            holders = [asyncio.create_task(hold(c, e)) for e in readies]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 60)
            queued = asyncio.create_task(c.post("/v1/completions", json={**long, "stream": False}))
            await wait_until(lambda: service.scheduler_snapshot()["num_waiting"] == 1, "the request queued")
            queued.cancel()  # the client hangs up
            await wait_until(lambda: service.scheduler_snapshot()["num_waiting"] == 0, "the request left the queue")
            snap = await asyncio.to_thread(service.scheduler_snapshot)  # a Serve handle: not on this loop
            assert snap["counters"]["cancelled_waiting"] == cancelled_before + 1
            # A request whose deadline passes while it waits: a 408, and it leaves the queue too.
            t0 = time.monotonic()
            r = await c.post("/v1/completions", json={**long, "stream": True, "timeout": 1})
            assert r.status_code == 408 and 1 <= time.monotonic() - t0 < 4, r.text
            assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "RequestTimeoutError",
                                         "param": "timeout", "code": 408}
            snap = await asyncio.to_thread(service.scheduler_snapshot)
            assert snap["num_waiting"] == 0 and snap["counters"]["cancelled_waiting"] == cancelled_before + 2
            for t in holders:
                t.cancel()
            await asyncio.gather(*holders, queued, return_exceptions=True)

    run(go())
    service.wait_idle()


# ---------------------------------------------------------------------- deadlines
def cancelled(service) -> int:
    return sum(s["requests_cancelled"] for s in service.worker_stats().values())


def test_a_request_past_its_deadline_is_aborted_and_its_blocks_freed(service, client):
    """Non-streaming: a 408 with an OpenAI body when the deadline passes; streaming: tokens, then an error event
    and [DONE]. Either way the request is aborted on its worker and its blocks are free a step later (well within
    the 2 s given here). A timeout above the maximum is a 400; the OpenAI client's read timeout (a header) shortens
    the deadline of a non-streaming request only."""
    service.wait_idle()
    long = {"model": MODEL_NAME, "prompt": "def main(", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    aborted = cancelled(service)

    t0 = time.monotonic()
    r = client.post("/v1/completions", json={**long, "timeout": 0.5})
    assert r.status_code == 408 and 0.5 <= time.monotonic() - t0 < 3, r.text
    assert r.json()["error"]["type"] == "RequestTimeoutError" and "0.5 s" in r.json()["error"]["message"]
    service.wait_idle(timeout_s=2)
    assert cancelled(service) == aborted + 1

    chat = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json={**chat, "timeout": 0.5}) as r:
        assert r.status_code == 200
        events = parse_sse(list(r.iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 408, events[-3:]
    tokens = sum(bool(e["choices"][0]["delta"].get("content")) for e in events[:-2])
    assert 0 < tokens < 480
    service.wait_idle(timeout_s=2)
    assert cancelled(service) == aborted + 2

    r = client.post("/v1/completions", json=long, headers={"X-Stainless-Read-Timeout": "0.5"})
    assert r.status_code == 408 and "0.5 s" in r.json()["error"]["message"]
    with client.stream("POST", "/v1/completions", json={**long, "max_tokens": 8, "stream": True},
                       headers={"X-Stainless-Read-Timeout": "0.001"}) as r:  # a read timeout says nothing of a stream
        assert r.status_code == 200 and parse_sse(list(r.iter_lines()))[-1] == "[DONE]"
    r = client.post("/v1/completions", json={**long, "timeout": 1e6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout", r.text
    service.wait_idle(timeout_s=2)
    assert cancelled(service) == aborted + 3


async def wait_until(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------- API keys
def test_api_keys_guard_the_api_but_not_health_or_the_playground_page(service):
    engine = service.engine.model_dump(mode="json")
    with side_app(service, "gpt2-keys", "/keys", engine, api_keys=["sk-one", "sk-two"]) as svc:
        with httpx.Client(base_url=svc.base_url, timeout=60) as c:
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                                 ("GET", "/playground/stats"), ("POST", "/v1/load_lora_adapter")):
                r = c.request(method, path, json={"prompt": "x"})
                assert r.status_code == 401, (path, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
            wrong = c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer sk-three"})
            assert wrong.status_code == 401
            assert c.get("/health").status_code == 200
            assert c.get("/playground/").status_code == 200 and c.get("/playground/playground.js").status_code == 200
            r = c.post("/v1/completions", json={"prompt": "def main(", "max_tokens": 4},
                       headers={"Authorization": "Bearer sk-two"})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            r = c.options("/v1/completions", headers={"Origin": "https://elsewhere.example",
                                                      "Access-Control-Request-Method": "POST"})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers  # CORS closed

        import openai

        ok = openai.OpenAI(base_url=svc.base_url + "/v1", api_key="sk-one")
        assert ok.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=svc.base_url + "/v1", api_key="sk-nope", max_retries=0).models.list()
        svc.wait_idle()
