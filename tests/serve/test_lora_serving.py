"""LoRA adapters through the service: `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, `model: "<adapter>"`,
`/v1/models`, hot-swapping while 20 streams run, and the scheduler (which holds the registry) killed under load.

One application of 2 workers with LoRA on (2 GPU slots per worker, rank up to 16), ``business`` preloaded by
the config, deployed beside the session's. Expected outputs come from an engine alone with the same adapter
directories, so "served by the adapter it named" means: the streamed text equals that engine's output for the
adapter (and the directory) the request's name stood for when the request was sent.
"""

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import make_peft_adapter
from tests.serve.conftest import MODEL_NAME, Service, parse_sse, side_app

pytest.importorskip("peft")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

APP, ROUTE = "gpt2-lora", "/lora"
NEW = 24
LONG = 160  # one stream that is sure to be running when its adapter is unloaded
NUM_STREAMS = 20
MAX_RANK = 16
# name -> (rank, alpha, targets, seed); "poetry-v2" is loaded later under the name "poetry"
ADAPTERS = {"business": (8, 16, ["c_attn", "c_proj", "c_fc"], 21), "poetry": (4, 8, ["c_attn"], 22),
            "poetry-v2": (8, 8, ["c_attn", "c_fc"], 23), "verse": (16, 16, ["c_fc", "c_proj"], 24)}


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    out = {name: make_peft_adapter(tiny_model_dir, root / name, *spec) for name, spec in ADAPTERS.items()}
    out["too-big"] = make_peft_adapter(tiny_model_dir, root / "too-big", 2 * MAX_RANK, 8, ["c_attn"], 25)
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"")
    out["broken"] = broken  # no adapter_config.json
    return out


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(17)
    return [" ".join(rng.choice(["the", "a", "market", "river", "song", "price", "night", "is", "of"])
                     for _ in range(rng.randrange(4, 12))) for _ in range(4)]


@pytest.fixture(scope="module")
def expected(service, dirs, prompts):
    """(directory key or None, prompt index, max_tokens) -> the text an engine alone generates."""
    from gpt2serve import LLM, EngineConfig, SamplingParams

    keys = [None, *ADAPTERS]
    llm = LLM(EngineConfig(**{
        **service.engine.model_dump(), "enable_lora": True, "max_loras": len(ADAPTERS), "max_lora_rank": MAX_RANK,
        "lora_modules": [{"name": k, "path": str(dirs[k])} for k in ADAPTERS]}))
    jobs = [(k, i, n) for k in keys for i in range(len(prompts)) for n in (NEW, LONG)]
    outs = llm.generate([prompts[i] for _, i, _ in jobs],
                        [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, _, n in jobs],
                        lora_name=[k for k, _, _ in jobs])
    table = {job: out.outputs[0].text for job, out in zip(jobs, outs)}
    assert len({table[(k, 0, NEW)] for k in keys}) == len(keys), "adapters that change nothing test nothing"
    return table


@pytest.fixture(scope="module")
def app(service, dirs):
    engine = {**service.engine.model_dump(mode="json"), "enable_lora": True, "max_loras": 2, "max_lora_rank": MAX_RANK,
              "lora_modules": [{"name": "business", "path": str(dirs["business"])}]}
    with side_app(service, APP, ROUTE, engine, workers=2, allow_runtime_lora_updating=True,
                  lora_allowed_roots=[str(dirs["business"].parent)]) as svc:
        yield svc


def _completion(model: str, prompt: str, max_tokens: int = NEW) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}


async def _stream_text(client: httpx.AsyncClient, body: dict, on_admitted=None) -> tuple[int, str | dict]:
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if on_admitted is not None:
            on_admitted()
        if r.status_code != 200:
            return r.status_code, json.loads(await r.aread())
        events = parse_sse([line async for line in r.aiter_lines()])
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events[-3:]
    return 200, "".join(e["choices"][0]["text"] for e in events[:-1])


def _held_uids(svc: Service) -> dict[str, set[str]]:
    return {wid: set(s["lora_held"]) for wid, s in svc.worker_stats().items()}


def test_adapters_are_listed_and_bad_input_gets_4xx(app, dirs, prompts, expected):
    async def scenario():
        async with httpx.AsyncClient(base_url=app.base_url, timeout=60) as client:
            models = (await client.get("/v1/models")).json()["data"]
            assert [(m["id"], m["parent"]) for m in models] == [(MODEL_NAME, None), ("business", MODEL_NAME)]

            r = await client.post("/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 404
            assert r.json()["error"] == {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                                         "param": "model", "code": 404}

            async def load(name, path):
                return await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})

            r = await load("broken", dirs["broken"])
            assert r.status_code == 400 and "has no adapter_config.json" in r.json()["error"]["message"]
            r = await load("big", dirs["too-big"])
            assert r.status_code == 400
            assert r.json()["error"]["message"] == f"adapter rank {2 * MAX_RANK} exceeds max_lora_rank {MAX_RANK}"
            # Missing and outside the allowed roots: one message, which tells nothing about what exists.
            messages = set()
            for path in (dirs["broken"] / "nowhere", dirs["broken"].parent.parent, "/etc", "/nowhere"):
                r = await load("missing", path)
                assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
                messages.add(r.json()["error"]["message"].replace(repr(str(path)), "<path>"))
            assert len(messages) == 1 and "lora_allowed_roots" in messages.pop()
            r = await load("business", dirs["verse"])
            assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
            r = await client.post("/v1/load_lora_adapter", json={"lora_name": "x"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
            r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
            assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]

            # None of it changed what is served, nor what the workers hold.
            assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == [MODEL_NAME, "business"]
            for model, key in ((MODEL_NAME, None), ("business", "business")):
                assert await _stream_text(client, _completion(model, prompts[1])) == (200, expected[(key, 1, NEW)])

    asyncio.run(scenario())
    assert all(held == {"business#0"} for held in _held_uids(app).values())
    app.wait_idle()


@dataclass
class Served:
    model: str
    key: str | None  # the adapter directory the name stood for when sent
    prompt: int
    status: int
    text: str | dict
    start: float
    end: float


def test_hot_swap_while_20_streams_run(app, dirs, prompts, expected):
    """Adapters loaded, used, unloaded and reloaded (another directory under the same name) while 20 clients
    stream without pause: no request fails, each gets its adapter's output, unloaded names answer 404 until
    reloaded, a stream running across its adapter's unload finishes with it, and the pools end empty."""
    available = {MODEL_NAME: None, "business": "business"}  # what clients may name now -> directory key
    admitting: Counter[str] = Counter()  # requests sent, response status not yet known
    served: list[Served] = []
    stop = asyncio.Event()
    log: list[tuple[str, float]] = []

    async def client_loop(client: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            model = rng.choice(sorted(available))
            key, p = available[model], rng.randrange(len(prompts))
            admitting[model] += 1
            done = [False]

            def admitted():
                if not done[0]:
                    done[0] = True
                    admitting[model] -= 1

            start = time.monotonic()
            try:
                status, text = await _stream_text(client, _completion(model, prompts[p]), admitted)
            finally:
                admitted()
            served.append(Served(model, key, p, status, text, start, time.monotonic()))

    async def withdraw(name: str) -> None:
        """Stop sending ``name`` and wait until every request that named it has its answer's status (so that
        none races the unload into a legitimate 404)."""
        available.pop(name)
        while admitting[name]:
            await asyncio.sleep(0.01)

    async def served_count(model: str, key: str | None, n: int, after: float) -> None:
        while sum(s.model == model and s.key == key and s.start >= after for s in served) < n:
            await asyncio.sleep(0.05)

    async def scenario():
        limits = httpx.Limits(max_connections=NUM_STREAMS + 8)
        async with httpx.AsyncClient(base_url=app.base_url, timeout=120, limits=limits) as client:
            async def post(path: str, **body) -> httpx.Response:
                r = await client.post(path, json=body)
                log.append((f"{path} {body} -> {r.status_code}", time.monotonic()))
                return r

            clients = [asyncio.create_task(client_loop(client, seed)) for seed in range(NUM_STREAMS)]
            t0 = time.monotonic()
            await served_count("business", "business", 3, t0)
            assert (await post("/v1/load_lora_adapter", lora_name="poetry", lora_path=str(dirs["poetry"]))).status_code == 200
            available["poetry"] = "poetry"
            assert (await post("/v1/load_lora_adapter", lora_name="verse", lora_path=str(dirs["verse"]))).status_code == 200
            available["verse"] = "verse"
            t1 = time.monotonic()
            await asyncio.gather(served_count("poetry", "poetry", 4, t1), served_count("verse", "verse", 4, t1))

            # A long poetry stream, certainly running when poetry is unloaded.
            long_first = asyncio.Event()
            long_body = {**_completion("poetry", prompts[2], LONG)}

            async def long_stream() -> tuple[int, str]:
                async with client.stream("POST", "/v1/completions", json=long_body) as r:
                    parts = []
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            parts.append(json.loads(line[6:])["choices"][0]["text"])
                            long_first.set()
                    return r.status_code, "".join(parts)

            long_task = asyncio.create_task(long_stream())
            await long_first.wait()
            await withdraw("poetry")
            assert (await post("/v1/unload_lora_adapter", lora_name="poetry")).status_code == 200
            assert not long_task.done(), "the long stream should still be running across the unload"
            r = await client.post("/v1/completions", json=_completion("poetry", prompts[0]))
            assert r.status_code == 404 and r.json()["error"]["param"] == "model"
            # A bad load in the middle of it all: refused, nobody else notices.
            assert (await post("/v1/load_lora_adapter", lora_name="big", lora_path=str(dirs["too-big"]))).status_code == 400

            await withdraw("business")  # the adapter the config preloaded
            assert (await post("/v1/unload_lora_adapter", lora_name="business")).status_code == 200
            assert (await post("/v1/load_lora_adapter", lora_name="poetry",
                               lora_path=str(dirs["poetry-v2"]))).status_code == 200
            available["poetry"] = "poetry-v2"
            assert (await post("/v1/load_lora_adapter", lora_name="business",
                               lora_path=str(dirs["business"]))).status_code == 200
            available["business"] = "business"
            t2 = time.monotonic()
            await asyncio.gather(served_count("poetry", "poetry-v2", 4, t2), served_count("business", "business", 4, t2))
            models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            assert models == [MODEL_NAME, "business", "poetry", "verse"]
            stop.set()
            await asyncio.gather(*clients)
            return await long_task

    long_status, long_text = asyncio.run(asyncio.wait_for(scenario(), 240))
    assert long_status == 200 and long_text == expected[("poetry", 2, LONG)]
    failed = [s for s in served if s.status != 200]
    assert not failed, f"{len(failed)} of {len(served)} requests failed, e.g. {failed[:3]}\n{log}"
    wrong = [s for s in served if s.text != expected[(s.key, s.prompt, NEW)]]
    assert not wrong, f"{len(wrong)} of {len(served)} requests got another model's output, e.g. {wrong[:3]}"
    per_key = Counter(s.key for s in served)
    assert set(per_key) == {None, "business", "poetry", "poetry-v2", "verse"} and len(served) >= 60, per_key
    app.wait_idle()
    # Both workers converge on the registry (the old poetry goes once its last request is released).
    deadline = time.monotonic() + 10
    while len(set(map(frozenset, _held_uids(app).values()))) != 1 or \
            sorted(u.split("#")[0] for u in next(iter(_held_uids(app).values()))) != ["business", "poetry", "verse"]:
        assert time.monotonic() < deadline, _held_uids(app)
        time.sleep(0.2)


async def _answer(client: httpx.AsyncClient, body: dict) -> tuple[int, str | dict, str | None]:
    """(status, text or error body, Retry-After): an error event ending a stream counts with its own code."""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, json.loads(await r.aread()), r.headers.get("retry-after")
        events = parse_sse([line async for line in r.aiter_lines()])
    assert events[-1] == "[DONE]", events[-3:]
    if "error" in events[-2]:
        return events[-2]["error"]["code"], events[-2], None
    return 200, "".join(e["choices"][0]["text"] for e in events[:-1]), None


def _kill_scheduler(app_name: str) -> None:
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{app_name}#Scheduler#")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def test_a_killed_scheduler_is_replaced_and_rebuilds_its_state_from_the_workers(app, dirs, prompts, expected):
    """20 clients stream over every adapter (runtime loads among them: the registry the scheduler held) when the
    scheduler replica is killed. Every request in flight ends within 5 s, with its adapter's output or a retryable
    503 (those queued in the scheduler); none hangs. Serve starts a new scheduler, which rebuilds from the
    workers' heartbeats: the first request after the kill names a runtime-loaded adapter and is served by it (no
    404 while the registry is rebuilt), every adapter resolves to its weights again, an adapter reloaded after the
    restart gets a uid no worker held before, and the pools end free."""
    available = {MODEL_NAME: None, "business": "business", "poetry": "poetry-v2", "verse": "verse"}
    answered: list[tuple[str | None, int, int, str | dict, str | None, float, float]] = []
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            model = rng.choice(sorted(available))
            p, start = rng.randrange(len(prompts)), time.monotonic()
            status, text, retry_after = await _answer(client, _completion(model, prompts[p]))
            answered.append((available[model], p, status, text, retry_after, start, time.monotonic()))

    async def scenario():
        limits = httpx.Limits(max_connections=NUM_STREAMS + 8)
        async with httpx.AsyncClient(base_url=app.base_url, timeout=120, limits=limits) as client:
            clients = [asyncio.create_task(client_loop(client, seed)) for seed in range(NUM_STREAMS)]
            while len(answered) < 2 * NUM_STREAMS:
                await asyncio.sleep(0.05)
            held_before = set().union(*(await asyncio.to_thread(_held_uids, app)).values())
            stop.set()  # no request starts after the kill: each one in flight must end on its own
            killed_at = time.monotonic()
            await asyncio.to_thread(_kill_scheduler, app.app)
            await asyncio.wait_for(asyncio.gather(*clients), 30)
            in_flight = [a for a in answered if a[6] > killed_at]
            # The first request after the kill, retried as a client would while the scheduler restarts: once it
            # reaches the new replica, that replica resolves the name from the registry rebuilt from heartbeats.
            retries = []
            while True:
                first = await asyncio.wait_for(_answer(client, _completion("verse", prompts[0])), 60)
                if first[0] != 503 or len(retries) == 30:
                    break
                retries.append(first)
                await asyncio.sleep(float(first[2] or 1))
            again = await asyncio.gather(*(_answer(client, _completion(model, prompts[i]))
                                           for model in available for i in range(len(prompts))))
            assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "poetry"})).status_code == 200
            r = await client.post("/v1/load_lora_adapter",
                                  json={"lora_name": "poetry", "lora_path": str(dirs["poetry"])})
            assert r.status_code == 200, r.text
            reloaded = await _answer(client, _completion("poetry", prompts[1]))
            return killed_at, in_flight, retries, first, again, held_before, reloaded

    killed_at, in_flight, retries, first, again, held_before, reloaded = asyncio.run(asyncio.wait_for(scenario(), 200))
    assert in_flight, "the kill came when no request was in flight: it tested nothing"
    late = [a for a in in_flight if a[6] - killed_at > 5]
    assert not late, f"{len(late)} requests took more than 5 s after the kill, e.g. {late[:2]}"
    for key, p, status, text, retry_after, _, _ in in_flight:
        assert status in (200, 503), (status, text)
        if status == 200:
            assert text == expected[(key, p, NEW)]
        else:
            assert "retry" in text["error"]["message"] and (retry_after is None or int(retry_after) >= 1), text
    assert all("restarting" in r[1]["error"]["message"] for r in retries), retries
    assert first == (200, expected[("verse", 0, NEW)], None)
    keys = [available[m] for m in available for _ in prompts]
    assert [(status, text) for status, text, _ in again] == [
        (200, expected[(key, i % len(prompts), NEW)]) for i, key in enumerate(keys)]
    assert reloaded == (200, expected[("poetry", 1, NEW)], None)
    app.wait_idle()
    from ray import serve

    listing = serve.get_deployment_handle("Scheduler", app_name=app.app).list_loras.remote().result(timeout_s=30)
    (poetry,) = [ref for ref in listing["adapters"] if ref.name == "poetry"]
    assert poetry.path == str(dirs["poetry"]) and all(poetry.uid in held for held in _held_uids(app).values())
    assert poetry.uid not in held_before  # another epoch: never the uid of a load some worker still held
