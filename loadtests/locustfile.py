"""Locust load test for the OpenAI-compatible service: closed-loop users that stream completions.

Every user sends a request, reads its SSE stream to the end and sends the next one at once (W4 of
benchmarks/README.md is 100 of them, 256-token prompts, 128 output tokens, EOS ignored). Besides Locust's own
entry per request (its response time is the whole stream; its "size" is the completion tokens), each streamed
request records two custom metrics under request types ``TTFT`` (request sent to first token event) and ``TPOT``
((last token event - first) / (completion tokens - 1), the token count from the stream's ``usage``). Locust rounds
response times to whole milliseconds; the summary JSON (``--summary-json``) has exact percentiles, output tok/s
and, read from the service's ``/metrics`` before and after, GPU-seconds, dollars and $ per 1M output tokens.

Settings (flag or environment variable):
  --prompt-tokens / LOCUST_PROMPT_TOKENS    256, or a range "16-768" (uniform per request)
  --output-tokens / LOCUST_OUTPUT_TOKENS    128, or a range "16-256"
  --request-mix   / LOCUST_REQUEST_MIX      weights of request kinds, default "stream=1":
                                            stream (completions, SSE), chat_stream (chat, SSE),
                                            completion (completions, one JSON response: no TTFT/TPOT)
  --max-token-id  / LOCUST_MAX_TOKEN_ID     prompts are random token ids in [0, this] (50000; 500 for the tiny model)
  --ignore-eos    / LOCUST_IGNORE_EOS       1: every request produces exactly its output tokens (checked)
  --model         / LOCUST_MODEL            model name; default: the first of /v1/models
  --seed          / LOCUST_SEED             0
  --summary-json  / LOCUST_SUMMARY_JSON     where to write the summary

Every request is also counted by how it was answered (``outcomes`` in the summary): ``ok``; ``retryable`` (HTTP 408,
429 or 503 with Retry-After, or a stream ending with an error event of code 408, 429 or 503: what a client retries);
``http_500``; ``error_<status>`` for any other status; ``incomplete`` (answered, but not with the tokens asked for);
``lost`` (no answer at all: the connection broke, or a stream ended with neither [DONE] nor an error event).

Headless W4 at 100 users, CSV and HTML report (``--processes`` spreads users over cores, so that the load
generator's own CPU does not inflate the latencies it measures):

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 100 -r 100 -t 60s \\
        --processes 4 --csv results/w4 --html results/w4.html --summary-json results/w4.json
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.request
from collections import Counter
from typing import Any

from locust import FastHttpUser, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

KINDS = ("stream", "chat_stream", "completion")
_samples: dict[str, list[float]] = {"ttft": [], "tpot": [], "e2e": []}
_tokens = [0]  # output tokens of completed requests in this process (sent to the master by workers)
_outcomes: Counter[str] = Counter()  # how this process's requests were answered (see the module docstring)
_totals: dict[str, Any] = {"ttft": [], "tpot": [], "e2e": [], "tokens": 0, "outcomes": Counter()}  # on the master
RETRYABLE = (408, 429, 503)
_service_before: dict[str, float] = {}


@events.init_command_line_parser.add_listener
def _(parser) -> None:
    parser.add_argument("--prompt-tokens", env_var="LOCUST_PROMPT_TOKENS", default="256", help="N or LO-HI")
    parser.add_argument("--output-tokens", env_var="LOCUST_OUTPUT_TOKENS", default="128", help="N or LO-HI")
    parser.add_argument("--request-mix", env_var="LOCUST_REQUEST_MIX", default="stream=1",
                        help="kind=weight,... over " + ", ".join(KINDS))
    parser.add_argument("--max-token-id", env_var="LOCUST_MAX_TOKEN_ID", type=int, default=50000)
    parser.add_argument("--ignore-eos", env_var="LOCUST_IGNORE_EOS", type=int, default=1)
    parser.add_argument("--model", env_var="LOCUST_MODEL", default="")
    parser.add_argument("--seed", env_var="LOCUST_SEED", type=int, default=0)
    parser.add_argument("--summary-json", env_var="LOCUST_SUMMARY_JSON", default="", include_in_web_ui=False)


def parse_range(spec: str) -> tuple[int, int]:
    lo, _, hi = str(spec).partition("-")
    return int(lo), int(hi or lo)


def parse_mix(spec: str) -> tuple[list[str], list[float]]:
    kinds, weights = [], []
    for part in spec.split(","):
        kind, _, weight = part.strip().partition("=")
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} in the request mix; known: {', '.join(KINDS)}")
        kinds.append(kind)
        weights.append(float(weight or 1))
    return kinds, weights


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class StreamFailure(Exception):
    def __init__(self, message: str, outcome: str):
        super().__init__(message)
        self.outcome = outcome


def outcome(status: int, retry_after: str | None = None, event: bool = False) -> str:
    """The class of an error answer: an HTTP status (with its Retry-After header), or a stream's error event."""
    if status == 0:  # FastHttpUser's status for a connection that broke before any answer
        return "lost"
    if status in RETRYABLE and (event or status == 408 or retry_after):
        return "retryable"
    return "http_500" if status == 500 else f"error_{status}"


class LLMUser(FastHttpUser):
    wait_time = constant(0)  # closed loop: the next request as soon as the last one ends
    _count = 0

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        LLMUser._count += 1  # users of this process; with --processes, each worker process has its own index
        worker = getattr(self.environment.runner, "worker_index", 0)
        self.rng = random.Random((opts.seed * 1_000_003 + worker) * 1_000_003 + LLMUser._count)
        self.prompt_range = parse_range(opts.prompt_tokens)
        self.output_range = parse_range(opts.output_tokens)
        self.kinds, self.weights = parse_mix(opts.request_mix)
        self.max_token_id = opts.max_token_id
        self.ignore_eos = bool(opts.ignore_eos)
        self.model = opts.model or self.client.get("/v1/models", name="/v1/models").json()["data"][0]["id"]

    @task
    def request(self) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        prompt = [self.rng.randint(0, self.max_token_id) for _ in range(self.rng.randint(*self.prompt_range))]
        max_tokens = self.rng.randint(*self.output_range)
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0,
                                "ignore_eos": self.ignore_eos}
        if kind == "chat_stream":
            # Chat takes text: the ids' digits make a prompt of about the same number of tokens.
            body["messages"] = [{"role": "user", "content": " ".join(str(t) for t in prompt)}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = prompt
            path = "/v1/completions"
        if kind == "completion":
            self._plain(path, body, kind)
        else:
            body.update(stream=True, stream_options={"include_usage": True})
            self._stream(path, body, kind)

    def _plain(self, path: str, body: dict, kind: str) -> None:
        with self.client.post(path, json=body, name=f"{path} [{kind}]", catch_response=True) as resp:
            if resp.status_code != 200:
                _outcomes[outcome(resp.status_code, resp.headers.get("retry-after"))] += 1
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            tokens = resp.json()["usage"]["completion_tokens"]
            if self._check(resp, tokens, body["max_tokens"]):
                resp.request_meta["response_length"] = tokens
                _samples["e2e"].append(resp.request_meta["response_time"] / 1000)
                _tokens[0] += tokens

    def _stream(self, path: str, body: dict, kind: str) -> None:
        start = time.perf_counter()
        first = None
        usage = None
        done = False
        buffer = b""
        with self.client.post(path, json=body, name=f"{path} [{kind}]", stream=True,
                              catch_response=True) as resp:
            try:
                if resp.status_code != 200:
                    raise StreamFailure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}",
                                        outcome(resp.status_code, resp.headers.get("retry-after")))
                # Small reads: geventhttpclient's read(n) waits for n bytes, and the first event must not wait.
                for chunk in resp.iter_content(chunk_size=64, decode_content=False):
                    if first is None:
                        first = time.perf_counter()  # the first event's bytes: headers go out with it
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        data = event.decode().removeprefix("data: ")
                        if data == "[DONE]":
                            done = True
                            continue
                        payload = json.loads(data)
                        if "error" in payload:
                            error = payload["error"]
                            raise StreamFailure(f"error event {error.get('code')}: {error.get('message', '')[:200]}",
                                                outcome(int(error.get("code") or 500), event=True))
                        if payload.get("usage"):
                            usage = payload["usage"]
                end = time.perf_counter()
                if not done or usage is None or first is None:
                    raise StreamFailure(f"stream ended early (done={done}, usage={usage is not None})", "lost")
            except StreamFailure as e:
                _outcomes[e.outcome] += 1
                resp.failure(str(e))
                return
            except Exception as e:  # noqa: BLE001 - a broken stream is a failed request, not a crashed user
                _outcomes["lost"] += 1
                resp.failure(f"{type(e).__name__}: {e}")
                return
            tokens = usage["completion_tokens"]
            if not self._check(resp, tokens, body["max_tokens"]):
                return
            resp.request_meta["response_time"] = (end - start) * 1000  # the whole stream, not just its headers
            resp.request_meta["response_length"] = tokens
        ttft, e2e = first - start, end - start
        self._custom("TTFT", kind, ttft)
        _samples["ttft"].append(ttft)
        _samples["e2e"].append(e2e)
        _tokens[0] += tokens
        if tokens > 1:
            tpot = (end - first) / (tokens - 1)
            self._custom("TPOT", kind, tpot)
            _samples["tpot"].append(tpot)

    def _check(self, resp, tokens: int, max_tokens: int) -> bool:
        if self.ignore_eos and tokens != max_tokens:
            _outcomes["incomplete"] += 1
            resp.failure(f"{tokens} completion tokens, expected {max_tokens} (ignore_eos)")
            return False
        _outcomes["ok"] += 1
        resp.success()
        return True

    def _custom(self, metric: str, kind: str, seconds: float) -> None:
        events.request.fire(request_type=metric, name=kind, response_time=seconds * 1000, response_length=0,
                            exception=None, context={})


# ---------------------------------------------------------------------- aggregation and the summary
def _drain() -> dict[str, Any]:
    data = {k: list(v) for k, v in _samples.items()}
    data["tokens"] = _tokens[0]
    data["outcomes"] = dict(_outcomes)
    for v in _samples.values():
        v.clear()
    _tokens[0] = 0
    _outcomes.clear()
    return data


def _absorb(data: dict[str, Any]) -> None:
    for k in ("ttft", "tpot", "e2e"):
        _totals[k].extend(data.get(k, []))
    _totals["tokens"] += data.get("tokens", 0)
    _totals["outcomes"].update(data.get("outcomes", {}))


@events.report_to_master.add_listener
def _(client_id, data, **kwargs) -> None:
    data["gpt2serve"] = _drain()


@events.worker_report.add_listener
def _(client_id, data, **kwargs) -> None:
    if "gpt2serve" in data:
        _absorb(data["gpt2serve"])


def service_counters(host: str) -> dict[str, float]:
    """Sums over replicas of the cost and token counters on the service's /metrics ({} if unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"{host.rstrip('/')}/metrics", timeout=10).read().decode()
    except OSError:
        return {}
    wanted = {"gpt2serve:gpu_seconds_total", "gpt2serve:cost_dollars_total", "gpt2serve:generation_tokens_total",
              "gpt2serve:gpu_price_dollars_per_hour", "gpt2serve:num_gpus"}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "gpt2serve:gpu_price_dollars_per_hour":  # a price: the replicas' highest, not a sum
                out[s.name] = max(out.get(s.name, 0.0), s.value)
            elif s.name in wanted:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


@events.test_start.add_listener
def _(environment, **kwargs) -> None:
    if not isinstance(environment.runner, WorkerRunner) and environment.host:
        _service_before.update(service_counters(environment.host))


@events.quitting.add_listener
def _(environment, **kwargs) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    if not isinstance(environment.runner, MasterRunner):
        _absorb(_drain())
    opts = environment.parsed_options
    stats = environment.stats
    wall = max((stats.total.last_request_timestamp or 0) - stats.total.start_time, 1e-9)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    summary: dict[str, Any] = {
        "users": opts.num_users, "run_time_s": opts.run_time, "host": environment.host,
        "prompt_tokens": opts.prompt_tokens, "output_tokens": opts.output_tokens, "request_mix": opts.request_mix,
        "requests": sum(e.num_requests for (_, method), e in stats.entries.items() if method == "POST"),
        "failures": stats.total.num_failures, "wall_s": round(wall, 3), "output_tokens_total": _totals["tokens"],
        "out_tok_s": round(_totals["tokens"] / wall, 2),
        "ttft_ms_p50": ms(percentile(_totals["ttft"], 50)), "ttft_ms_p99": ms(percentile(_totals["ttft"], 99)),
        "tpot_ms_p50": ms(percentile(_totals["tpot"], 50)), "tpot_ms_p99": ms(percentile(_totals["tpot"], 99)),
        "e2e_ms_p50": ms(percentile(_totals["e2e"], 50)), "e2e_ms_p99": ms(percentile(_totals["e2e"], 99)),
        "num_ttft": len(_totals["ttft"]), "num_tpot": len(_totals["tpot"]),
        "outcomes": dict(sorted(_totals["outcomes"].items())),
    }
    summary["req_s"] = round(len(_totals["e2e"]) / wall, 3)
    summary["errors_pct"] = round(100 * summary["failures"] / max(summary["requests"], 1), 3)
    after = service_counters(environment.host) if environment.host else {}
    if _service_before and after and all(after[k] >= _service_before.get(k, 0.0) for k in after):
        delta = {k: after[k] - _service_before.get(k, 0.0) for k in after}  # (a restarted service: no figures)
        gen = delta.get("gpt2serve:generation_tokens_total", 0.0)
        dollars = delta.get("gpt2serve:cost_dollars_total", 0.0)
        summary.update({
            "service_generation_tokens": gen, "gpu_seconds": round(delta.get("gpt2serve:gpu_seconds_total", 0.0), 3),
            "cost_dollars": dollars, "num_gpus": after.get("gpt2serve:num_gpus"),
            "price_per_gpu_hour": after.get("gpt2serve:gpu_price_dollars_per_hour"),
            "dollars_per_1m_output_tokens": round(dollars / gen * 1e6, 6) if gen else None,
        })
    print("gpt2serve summary: " + json.dumps(summary))
    if opts.summary_json:
        with open(opts.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
