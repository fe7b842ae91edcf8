"""The ingress deployment: the OpenAI-compatible HTTP API (FastAPI inside Serve).

Per request: the gate (``actors/gate.py``: API key, CORS), then one validation path for every POST body
(``_parse``: content type, size, pydantic, the service's limits), the engine's own checks, tokenizing (off the
event loop when long), all before anything is queued; then ``Streams`` (actors/streams.py) gets a worker from
the scheduler and the tokens from that worker's channel; this module turns them into OpenAI responses.

Deadlines (``_deadline``): every request has one, from its ``timeout`` field, else the service's
``request_timeout_s`` (shortened, for a non-streaming request, to the OpenAI client's own read timeout, which it
sends as ``X-Stainless-Read-Timeout``: past it nobody reads the answer). ``Streams`` enforces it; past it the
request is aborted and answered 408, or ends with an SSE error event once streaming.

Response headers are sent only once the worker's first item is here, so that everything that can go wrong
before the first token (queue full, request too big for the pool, worker gone) still gets its own HTTP status,
streaming or not. After that, a failure becomes an SSE error event followed by ``data: [DONE]``.

Cancellation: a client that disconnects cancels this handler (Serve's proxy cancels the call, Starlette's
streaming response cancels its body iterator, and until the response starts ``until_disconnect`` watches for it,
which the replica's own HTTP server would not do); ``Streams.close`` in a ``finally`` then aborts the request on
its worker and releases the scheduler's reservation, and a request still queued leaves the queue.
"""


import asyncio
import json
import logging
import math
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import (FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response,
                               StreamingResponse)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError
from ray import serve

from gpt2serve.actors import openai_api as oa
from gpt2serve.actors.gate import Access, Gate, warn_if_open
from gpt2serve.actors.http_listener import HTTPListener
from gpt2serve.actors.lora_registry import allowed_adapter_dir
from gpt2serve.actors.metrics import SnapshotCollector
from gpt2serve.actors.protocol import LoRARef
from gpt2serve.actors.routing import ROUTING_POLICIES
from gpt2serve.actors.settings import ServiceConfig
from gpt2serve.actors.streams import Deadline, Job, Streams, detached
from gpt2serve.engine.errors import InvalidRequestError
from gpt2serve.engine.lora import LoRAError
from gpt2serve.engine.loader import load_hf_config
from gpt2serve.engine.metrics import WORKER_METRICS, merge_families
from gpt2serve.engine.sampling_params import SamplingParams
from gpt2serve.engine.tokenizer import load_tokenizer

log = logging.getLogger("ray.serve")

app = FastAPI(title="gpt2-serve", docs_url=None, redoc_url=None)
T = TypeVar("T")
# Text longer than this is tokenized on a thread, so that one long prompt does not hold up every other stream's
# tokens on this event loop; shorter text costs less than the hop to a thread.
INLINE_TOKENIZE_CHARS = 2048
JSON_TYPES = ("application/json",)
CLIENT_TIMEOUT_HEADER = "x-stainless-read-timeout"  # the OpenAI client's read timeout, sent with every request


def error_response(exc: oa.APIError) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(exc.retry_after_s))} if exc.retry_after_s else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@app.exception_handler(oa.APIError)
async def _api_error(request: Request, exc: oa.APIError) -> JSONResponse:
    return error_response(exc)


def internal_error(where: str) -> oa.APIError:
    """A bug, or the scheduler itself unreachable: logged with an id the client gets, and nothing of the
    exception itself (its text may quote the request or the server's files)."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("unexpected error %s serving %s", error_id, where)
    return oa.APIError(500, f"internal error {error_id}: the service logged it")


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(internal_error(request.url.path))  # an OpenAI-shaped body, never Starlette's text


def _replica_access() -> Access | None:
    return getattr(_replica(), "access", None)


app.add_middleware(Gate, policy=_replica_access)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``, unless the client hangs up first: then ``work`` is cancelled (a request waiting in the global
    queue leaves it, one already started is aborted) and ClientGone raised. Serve's proxy cancels the handler
    itself on a disconnect; the replica's own HTTP server only reports it on ``receive``, which nobody calls
    between reading the body and sending the response, so without this a queued request would run for nobody.
    For a body already read, the next message can only be the disconnect."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled: the work goes with it
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    try:
        await task  # its cleanup (leaving the queue, closing the streams) runs before the handler returns
    except BaseException:  # noqa: BLE001 - cancelled, or failed on its way out: the client is gone either way
        pass
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected once the body is read; never a busy loop if it happens


class ClientGone(Exception):
    """The client disconnected before its response started."""


class ClosingStreamingResponse(StreamingResponse):
    """Runs ``on_close`` however the response ends: finished, failed, cancelled by a disconnect, or even
    cancelled before Starlette started iterating the body (when the body's own ``finally`` never runs)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Families:
    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


# ---------------------------------------------------------------------- the playground (docs/playground.md)
PLAYGROUND_DIR = Path(__file__).with_name("playground")
PLAYGROUND_FILES = ("index.html", "playground.js", "playground.css")
_SERIES = {key: WORKER_METRICS[key].series() for key in ("generation_tokens", "cost_dollars", "num_gpus",
                                                          "gpu_price_dollars_per_hour")}


class LiveView:
    """The playground's live numbers, from what ``/metrics`` gathers: the pool and the batch from each worker's
    last heartbeat (scheduler snapshot), tokens and dollars from its metric families. Those two are counters, so
    rates come from this ingress's own recent calls, as Prometheus's ``rate()`` would over ``window_s``."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self.history: deque[tuple[float, dict[str, tuple[float, float]]]] = deque()

    def update(self, snap: dict[str, Any], families: dict[str, list], now: float) -> dict[str, Any]:
        workers, counters = [], {}
        for wid, w in sorted(snap["workers"].items()):
            values: dict[str, float] = {}
            for fam in families.get(wid, []):
                for s in fam.samples:
                    values[s.name] = values.get(s.name, 0.0) + s.value
            if _SERIES["generation_tokens"] in values:  # else its families did not come (slow or dying worker)
                counters[wid] = (values[_SERIES["generation_tokens"]], values.get(_SERIES["cost_dollars"], 0.0))
            st = w["stats"]
            workers.append({"id": wid, "running": st["num_running"], "waiting": st["num_waiting"],
                            "free_blocks": st["num_free_blocks"], "total_blocks": st["num_total_blocks"],
                            "heartbeat_age_s": round(w["age_s"], 3),
                            "dollars_per_hour": values.get(_SERIES["num_gpus"], 0.0)
                            * values.get(_SERIES["gpu_price_dollars_per_hour"], 0.0)})
        # Keep one sample at least window_s old as the baseline; a worker's counters only grow, except when
        # the worker is replaced, so a drop counts as zero.
        self.history.append((now, counters))
        while len(self.history) > 2 and now - self.history[1][0] >= self.window_s:
            self.history.popleft()
        then, base = self.history[0]
        seconds = now - then
        tokens = sum(max(c[0] - base[k][0], 0.0) for k, c in counters.items() if k in base)
        dollars = sum(max(c[1] - base[k][1], 0.0) for k, c in counters.items() if k in base)
        total = sum(w["total_blocks"] for w in workers)
        free = sum(w["free_blocks"] for w in workers)
        return {
            "running": sum(w["running"] for w in workers),
            "waiting": {"queue": snap["num_waiting"], "engines": sum(w["waiting"] for w in workers)},
            "kv": {"free_blocks": free, "total_blocks": total, "used_blocks": total - free,
                   "usage_perc": 100.0 * (total - free) / total if total else 0.0},
            "rates": {"window_s": round(seconds, 3),
                      "output_tokens_per_s": tokens / seconds if seconds else None,
                      # idle time included, as the PromQL in docs/telemetry.md; undefined with no token
                      "dollars_per_1m_output_tokens": 1e6 * dollars / tokens if tokens else None},
            # What one replica costs per hour (the workers' resolved `cost:` setting), for per-request costs.
            "replica_dollars_per_hour": sum(w["dollars_per_hour"] for w in workers) / len(workers) if workers else 0.0,
            "workers": workers,
        }


def _replica() -> "Ingress | None":
    """The routes find their Ingress through the replica context, which Serve fills once __init__ has returned."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - no context yet
        return None


def _replica_ready() -> bool:
    return _replica() is not None


@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict[str, Any], scheduler, worker):
        cfg = ServiceConfig(**config)
        self.cfg = cfg
        self.scheduler = scheduler
        hf = load_hf_config(cfg.engine)  # geometry only: the same numbers the workers' engines derive
        self.max_model_len = min(cfg.engine.max_model_len or hf.n_positions, hf.n_positions)
        self.worker = worker
        # Prompts are hashed into block hashes here, once, only when the routing policy reads them.
        routing = ROUTING_POLICIES.build(cfg.routing_policy, **cfg.routing_policy_args)
        self.streams = Streams(scheduler, worker, self.max_model_len,
                               hash_block_size=cfg.engine.block_size if routing.uses_prefix_hashes else None)
        self.vocab_size = hf.vocab_size
        self.tokenizer = load_tokenizer(cfg.engine, hf.eos_token_id)
        self.token_text = oa.TokenText(self.tokenizer)
        self.created = oa.now_s()
        # The client's view, from this ingress (global queue and hops included); the engine's own view, under
        # vLLM's names (gpt2serve:time_to_first_token_seconds ...), comes from the workers: see metrics().
        self.registry = CollectorRegistry()
        self.m_ttft = Histogram("gpt2serve:http_time_to_first_token_seconds", "Time to first token, at the ingress.",
                                buckets=(.01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5, 10, 20, 60),
                                registry=self.registry)
        self.m_tpot = Histogram("gpt2serve:http_time_per_output_token_seconds",
                                "Mean time per output token after the first, per request, at the ingress.",
                                buckets=(.005, .01, .015, .02, .025, .03, .04, .05, .075, .1, .15, .2, .3, .5, 1),
                                registry=self.registry)
        self.m_e2e = Histogram("gpt2serve:http_e2e_request_latency_seconds", "Request latency, at the ingress.",
                               buckets=(.1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300), registry=self.registry)
        self.m_requests = Counter("gpt2serve:requests", "Requests answered, by HTTP status.", ["status"],
                                  registry=self.registry)
        self.m_prompt_tokens = Counter("gpt2serve:http_prompt_tokens", "Prompt tokens admitted.",
                                       registry=self.registry)
        self.m_generation_tokens = Counter("gpt2serve:http_generation_tokens", "Tokens sent to clients.",
                                           registry=self.registry)
        self.live = LiveView()
        self.loras: dict[str, LoRARef] = {}  # name -> load: the scheduler's registry, as last seen
        merged = next((m for m in cfg.engine.lora_modules if m.merge), None)
        self.merged_lora, self.merged_root = (merged.name, merged.path) if merged else (None, None)
        self.access = Access(cfg.api_keys, cfg.cors_allowed_origins)
        warn_if_open(self.access, cfg.http_listener.host if cfg.http_listener else None)
        self.lora_roots = [Path(root).resolve() for root in cfg.lora_allowed_roots]
        self.tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.listener = None
        if cfg.http_listener is not None:
            listen = cfg.http_listener
            try:
                self.listener = HTTPListener(app, listen.host, listen.port, _replica_ready, listen.graceful_shutdown_s)
            except OSError as e:  # another program holds the port without SO_REUSEPORT
                log.warning("cannot listen on %s:%s (%s): serving through Serve's HTTP proxy only", listen.host,
                            listen.port, e)

    async def __del__(self) -> None:
        # Serve calls this on graceful shutdown. Requests that came through the listener are not Serve's to drain.
        if self.listener is not None:
            await self.listener.close()

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:  # bounded: while Serve replaces a dead scheduler, the call would wait for the new replica
            snap = await asyncio.wait_for(self.scheduler.snapshot.remote(), 5.0)
        except Exception as e:  # noqa: BLE001 - a probe's answer, whatever went wrong
            log.warning("health: the scheduler did not answer: %r", e)
            return JSONResponse({"status": "scheduler unavailable", "workers": 0}, status_code=503)
        workers = len(snap["workers"])
        return JSONResponse({"status": "ok" if workers else "no workers", "workers": workers},
                            status_code=200 if workers else 503)

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """The base model, then each LoRA adapter by name (``parent``: the base model), as vLLM lists them."""
        base = {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "gpt2-serve",
                "root": self.cfg.engine.model, "parent": None, "max_model_len": self.max_model_len}
        adapters = await self._refresh_loras() if self.cfg.engine.enable_lora else []
        merged = [{**base, "id": self.merged_lora, "root": self.merged_root, "parent": self.cfg.model_name}
                  ] if self.merged_lora else []
        return {"object": "list", "data": [base, *merged, *[
            {**base, "id": ref.name, "root": ref.path, "parent": self.cfg.model_name}
            for ref in sorted(adapters, key=lambda r: r.name)]]}

    # ------------------------------------------------------------------ LoRA adapters (docs/lora.md)
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> Response:
        """Load a PEFT adapter on every worker; from then on requests may name it in ``model``."""
        try:
            self._require_lora_updating()
            body = await self._parse(request, oa.LoadLoRAAdapterRequest)
            try:
                path = allowed_adapter_dir(body.lora_path, self.lora_roots)
            except LoRAError as e:
                raise oa.APIError(400, str(e), "lora_path")
            status, message = await self.scheduler.load_lora.remote(body.lora_name, path)
        except oa.APIError as e:
            return error_response(e)
        if status != 200:
            return error_response(oa.APIError(status, message, retry_after_s=1 if status == 503 else None))
        await self._refresh_loras()
        return PlainTextResponse(message)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> Response:
        """Stop serving an adapter: new requests naming it get 404; requests already admitted finish with it."""
        try:
            self._require_lora_updating()
            body = await self._parse(request, oa.UnloadLoRAAdapterRequest)
            status, message = await self.scheduler.unload_lora.remote(body.lora_name)
        except oa.APIError as e:
            return error_response(e)
        if status != 200:
            return error_response(oa.APIError(status, message, "lora_name"))
        await self._refresh_loras()
        return PlainTextResponse(message)

    def _require_lora_updating(self) -> None:
        if not self.cfg.allow_runtime_lora_updating:
            raise oa.APIError(404, "runtime LoRA loading is off on this service (allow_runtime_lora_updating)")

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """This ingress's HTTP metrics, the scheduler's snapshot, and every routed worker's engine metrics
        (``engine/metrics.py``), merged into one family per name."""
        snap = await self.scheduler.snapshot.remote()
        families = await asyncio.gather(*(self._worker_families(w) for w in sorted(snap["workers"])))
        scrape = CollectorRegistry()
        scrape.register(SnapshotCollector(snap, model_name=self.cfg.model_name))
        scrape.register(_Families(merge_families(families)))
        return Response(generate_latest(self.registry) + generate_latest(scrape), media_type=CONTENT_TYPE_LATEST)

    async def _worker_families(self, worker_id: str) -> list:
        try:  # bounded: one slow or dying worker must not hold up the scrape
            return await asyncio.wait_for(
                detached(lambda: self.worker.metrics_families.remote(replica=worker_id)), 5.0)
        except Exception as e:  # noqa: BLE001 - a worker that just went away has no metrics to give
            log.warning("metrics of worker %s unavailable: %r", worker_id, e)
            return []

    # ------------------------------------------------------------------ playground (docs/playground.md)
    @app.get("/playground")
    async def playground_home(self) -> RedirectResponse:
        # Relative: the page's own links are relative (any route prefix works) and need the trailing slash.
        return RedirectResponse("playground/")

    @app.get("/playground/")
    async def playground_index(self) -> FileResponse:
        return await self.playground_file("index.html")

    @app.get("/playground/stats")
    async def playground_stats(self) -> dict[str, Any]:
        """The live view's numbers (see ``LiveView``); the workers' free and total KV blocks included."""
        snap = await self.scheduler.snapshot.remote()
        ids = sorted(snap["workers"])
        families = await asyncio.gather(*(self._worker_families(w) for w in ids))
        return {"model": self.cfg.model_name, **self.live.update(snap, dict(zip(ids, families)), time.monotonic())}

    @app.get("/playground/{name}")
    async def playground_file(self, name: str) -> FileResponse:
        if name not in PLAYGROUND_FILES:
            raise oa.APIError(404, f"the playground has no file {name!r}")
        return FileResponse(PLAYGROUND_DIR / name, headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            body = await self._parse(request, oa.CompletionRequest)
            deadline = self._deadline(request, body, arrival)
            rid = self._request_id(request)
            lora = await self._resolve_model(body.model)
            prompts = await self._tokenize_all(body.prompts())
            params = self._params(body, prompts, body.max_tokens, body.logprobs)
            jobs = await until_disconnect(request, self._start_all(rid, prompts, params, body.priority, arrival,
                                                                   lora, deadline))
        except oa.APIError as e:
            return self._fail(e)
        except ClientGone:
            return self._gone()
        first_at = time.monotonic()
        resp = {"id": f"cmpl-{rid}", "object": "text_completion", "created": oa.now_s(), "model": self.cfg.model_name}
        if body.stream:
            events = self._completion_events(jobs, resp, params, body.include_usage, arrival, first_at)
            return self._sse(events, jobs)
        return await self._respond(request, jobs, arrival, first_at, params.n, lambda choices: {**resp, "choices": [
            {"index": c.index, "text": "".join(c.text), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
             "logprobs": (oa.completion_logprobs(c.logprobs, self.token_text, 0)[0]
                          if params.logprobs is not None else None)} for c in choices]})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            body = await self._parse(request, oa.ChatCompletionRequest)
            deadline = self._deadline(request, body, arrival)
            rid = self._request_id(request)
            lora = await self._resolve_model(body.model)
            prompts = await self._tokenize_all([body.messages], param="messages")
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            top_n = (body.top_logprobs or 0) if body.logprobs else None
            params = self._params(body, prompts, max_tokens, top_n, param="messages")
            jobs = await until_disconnect(request, self._start_all(rid, prompts, params, body.priority, arrival,
                                                                   lora, deadline))
        except oa.APIError as e:
            return self._fail(e)
        except ClientGone:
            return self._gone()
        first_at = time.monotonic()
        resp = {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": oa.now_s(),
                "model": self.cfg.model_name}
        if body.stream:
            events = self._chat_events(jobs, {**resp, "object": "chat.completion.chunk"}, params, body.include_usage,
                                       arrival, first_at)
            return self._sse(events, jobs)
        return await self._respond(request, jobs, arrival, first_at, params.n, lambda choices: {**resp, "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
             "logprobs": oa.chat_logprobs(c.logprobs, self.token_text, top_n) if top_n is not None else None}
            for c in choices]})

    # ------------------------------------------------------------------ validation
    async def _parse(self, request: Request, model: type[oa._Request]) -> Any:
        """The one way in for a POST body: JSON by its content type (a form or text/plain POST, which any web
        page can send without asking, is 415), at most ``max_request_body_bytes`` (413), parsed by pydantic's
        own parser (bounded nesting; no NaN, no lone surrogates, no 5,000-digit numbers into a field), then
        the service's limits."""
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind not in JSON_TYPES:
            raise oa.APIError(415, f"the request body must be JSON (Content-Type: application/json), got "
                                   f"{kind or 'no content type'!r}")
        body = await self._read_body(request)
        try:
            parsed = model.model_validate_json(body)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int) and "[" not in str(x)) or None
            raise oa.APIError(400, f"{loc or 'body'}: {err['msg']}"[:500], loc)
        parsed.check(self.cfg.limits)
        return parsed

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_request_body_bytes
        too_large = oa.APIError(413, f"the request body is larger than {limit} bytes (max_request_body_bytes)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no length to check up front
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _resolve_model(self, name: str | None) -> LoRARef | None:
        """The adapter a request's ``model`` names (None: the base model); 404 if it names nothing served. From
        this ingress's copy of the scheduler's registry, refreshed on a miss: the admission has the last word."""
        if name is None or name in (self.cfg.model_name, self.cfg.engine.model) or name == self.merged_lora:
            return None
        if self.cfg.engine.enable_lora:
            if name not in self.loras:
                await self._refresh_loras()
            if name in self.loras:
                return self.loras[name]
        raise oa.APIError(404, f"The model `{name}` does not exist.", "model")

    async def _refresh_loras(self) -> list[LoRARef]:
        listing = await self.scheduler.list_loras.remote()
        self.loras = {ref.name: ref for ref in listing["adapters"]}
        return listing["adapters"]

    async def _tokenize_all(self, prompts: list[str | list[int] | list[oa.ChatMessage]],
                            param: str = "prompt") -> list[list[int]]:
        """Token ids of each prompt (text, ids, or chat messages to render), checked; on a thread when long."""
        size = sum(len(p) if isinstance(p, str) else sum(len(m.text()) for m in p if isinstance(m, oa.ChatMessage))
                   for p in prompts)  # token ids count nothing: there is nothing to tokenize
        if size <= INLINE_TOKENIZE_CHARS:
            return [self._tokenize(p, param) for p in prompts]
        return await asyncio.get_running_loop().run_in_executor(
            self.tokenizing, lambda: [self._tokenize(p, param) for p in prompts])

    def _tokenize(self, prompt: str | list[int] | list[oa.ChatMessage], param: str = "prompt") -> list[int]:
        if prompt and isinstance(prompt[0], oa.ChatMessage):
            prompt = oa.render_chat(prompt)
        try:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        except (UnicodeError, ValueError) as e:  # text the tokenizer cannot take
            raise oa.APIError(400, f"the {param} could not be tokenized: {type(e).__name__}", param)
        if not ids:
            raise oa.APIError(400, "the prompt is empty", param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise oa.APIError(400, f"token id {bad} is out of vocabulary (ids must be in [0, {self.vocab_size}))",
                              param)
        if len(ids) >= self.max_model_len:
            raise oa.APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                   f"your request has {len(ids)} input tokens and needs room for at least one "
                                   "generated token. Please reduce the length of the input.", param)
        return ids

    def _params(self, body: oa._SamplingFields, prompts: list[list[int]], max_tokens: int | None,
                logprobs: int | None, param: str = "prompt") -> SamplingParams:
        if body.n > self.cfg.max_n:
            raise oa.APIError(400, f"n must be at most {self.cfg.max_n}, got {body.n}", "n")
        try:
            params = body.sampling_params(max_tokens, logprobs)
        except InvalidRequestError as e:
            raise oa.APIError(400, str(e), e.param)
        if max_tokens is not None:
            longest = max(len(p) for p in prompts)
            if longest + max_tokens > self.max_model_len:
                raise oa.APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                       f"However, you requested {longest + max_tokens} tokens ({longest} in the "
                                       f"{'messages' if param == 'messages' else 'prompt'}, {max_tokens} in the "
                                       "completion). Please reduce the length of the input or completion.",
                                  "max_tokens")
        return params

    def _deadline(self, request: Request, body: oa._SamplingFields, arrival: float) -> Deadline:
        """The request's own ``timeout`` (at most ``max_request_timeout_s``), else ``request_timeout_s``, which the
        OpenAI client's read timeout can only shorten, and only without streaming: that header bounds the wait
        for each read, so for a stream it says nothing about the whole."""
        limit = self.cfg.max_request_timeout_s
        if body.timeout is not None:
            if body.timeout > limit:
                raise oa.APIError(400, f"timeout must be at most {limit:g} s (max_request_timeout_s), got "
                                       f"{body.timeout:g}", "timeout")
            return Deadline.after(body.timeout, arrival)
        timeout = self.cfg.request_timeout_s
        if not body.stream:
            try:
                client = float(request.headers.get(CLIENT_TIMEOUT_HEADER, "inf"))
            except ValueError:  # a hint, never a reason to refuse the request
                client = math.inf
            if 0 < client < timeout:
                timeout = client
        return Deadline.after(timeout, arrival)

    def _request_id(self, request: Request) -> str:
        # Serve's proxy passes the client's X-Request-Id through (or makes one up) and echoes it in the response.
        # It names the request in the engine, in logs and in response ids: bounded, printable.
        given = request.headers.get("x-request-id")
        limit = self.cfg.limits.max_request_id_length
        if given and (len(given) > limit or not given.isprintable()):
            raise oa.APIError(400, f"X-Request-Id must be at most {limit} printable characters", "X-Request-Id")
        return given if given else uuid.uuid4().hex

    def _fail(self, e: oa.APIError) -> JSONResponse:
        self.m_requests.labels(str(e.status)).inc()
        return error_response(e)

    def _gone(self) -> Response:
        self.m_requests.labels("499").inc()  # nginx's "client closed request": nobody reads this answer
        return Response(status_code=499)

    async def _start_all(self, rid: str, prompts: list[list[int]], params: SamplingParams, priority: int,
                         arrival: float, lora: LoRARef | None = None, deadline: Deadline | None = None) -> list[Job]:
        try:
            jobs = await self.streams.start_all(rid, prompts, params, priority, lora, deadline)
        except oa.APIError as e:
            if lora is not None and e.status == 404:  # unloaded since this ingress last looked
                self.loras.pop(lora.name, None)
            raise
        if lora is not None and jobs[0].lora is not None:  # reloaded since: a new uid
            self.loras[lora.name] = jobs[0].lora
        self.m_ttft.observe(time.monotonic() - arrival)
        self.m_prompt_tokens.inc(sum(len(p) for p in prompts))
        return jobs

    def _finished(self, arrival: float, first_at: float, tokens: int, status: int) -> None:
        end = time.monotonic()
        self.m_requests.labels(str(status)).inc()
        self.m_e2e.observe(end - arrival)
        self.m_generation_tokens.inc(tokens)
        if tokens > 1:
            self.m_tpot.observe((end - first_at) / (tokens - 1))

    # ------------------------------------------------------------------ responses
    async def _respond(self, request: Request, jobs: list[Job], arrival: float, first_at: float, n: int,
                       build) -> Response:
        choices: dict[int, oa.Choice] = {}

        async def collect() -> None:
            async for i, item in self.streams.merged(jobs):
                for d in item.seqs:
                    idx = i * n + d.index
                    choices.setdefault(idx, oa.Choice(idx)).add(d)

        try:
            await until_disconnect(request, collect())  # a client gone mid-generation stops it
        except oa.APIError as e:
            self._finished(arrival, first_at, 0, e.status)
            return error_response(e)
        except ClientGone:
            return self._gone()
        finally:
            self.streams.close(jobs)
        ordered = [choices[k] for k in sorted(choices)]
        completion_tokens = sum(c.num_tokens for c in ordered)
        self._finished(arrival, first_at, completion_tokens, 200)
        prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
        return JSONResponse({**build(ordered), "usage": oa.usage(prompt_tokens, completion_tokens)})

    def _sse(self, events: AsyncIterator[dict], jobs: list[Job]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            except Exception as e:  # noqa: BLE001 - headers are sent: the error becomes the stream's last event
                if not isinstance(e, oa.APIError):
                    e = internal_error("a stream")
                self.m_requests.labels(str(e.status)).inc()
                yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
            finally:
                self.streams.close(jobs)
            yield b"data: [DONE]\n\n"

        return ClosingStreamingResponse(body(), lambda: self.streams.close(jobs), media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache"})

    async def _completion_events(self, jobs: list[Job], resp: dict, params: SamplingParams, include_usage: bool,
                                 arrival: float, first_at: float) -> AsyncIterator[dict]:
        tokens = 0
        offsets: dict[int, int] = {}
        extra = {"usage": None} if include_usage else {}
        async for i, item in self.streams.merged(jobs):
            for d in item.seqs:
                idx = i * params.n + d.index
                tokens += len(d.token_ids)
                logprobs = None
                if params.logprobs is not None:
                    logprobs, offsets[idx] = oa.completion_logprobs(d.logprobs or [], self.token_text,
                                                                    offsets.get(idx, 0))
                yield {**resp, "choices": [{"index": idx, "text": d.text, "logprobs": logprobs,
                                            "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}], **extra}
        self._finished(arrival, first_at, tokens, 200)
        if include_usage:
            yield {**resp, "choices": [], "usage": oa.usage(sum(len(j.prompt_ids) for j in jobs), tokens)}

    async def _chat_events(self, jobs: list[Job], resp: dict, params: SamplingParams, include_usage: bool,
                           arrival: float, first_at: float) -> AsyncIterator[dict]:
        tokens = 0
        started: set[int] = set()
        extra = {"usage": None} if include_usage else {}
        async for _, item in self.streams.merged(jobs):
            for d in item.seqs:
                tokens += len(d.token_ids)
                if d.index not in started:  # OpenAI opens every choice with the role
                    started.add(d.index)
                    yield {**resp, "choices": [{"index": d.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}], **extra}
                logprobs = (oa.chat_logprobs(d.logprobs or [], self.token_text, params.logprobs)
                            if params.logprobs is not None else None)
                delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                yield {**resp, "choices": [{"index": d.index, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}], **extra}
        self._finished(arrival, first_at, tokens, 200)
        if include_usage:
            yield {**resp, "choices": [], "usage": oa.usage(len(jobs[0].prompt_ids), tokens)}
