"""W4 of ../shared/BENCHMARKS.md: online serving, 100 concurrent streaming clients in a closed loop for 60 s.

Each client sends a 256-token prompt of random ids (``random.Random(seed)`` over 0..50000), asks for 128 tokens
with ``ignore_eos``, reads the SSE stream to the end, and sends the next one at once. Reported: TTFT p50/p99,
TPOT p50/p99 (per request: time from first to last token over tokens - 1), output tok/s (tokens received inside
the window over its length), and errors.

    # against the service (start it first: GPT2SERVE_LOAD_FORMAT=dummy serve run configs/gpt2xl.yaml)
    python benchmarks/w4_serving.py --url http://127.0.0.1:8000 --out benchmarks/results/w4.json
    # the same load on the engine in this process (no HTTP, no Ray): the figure the service is compared with
    python benchmarks/w4_serving.py --in-process --config configs/gpt2xl.yaml --load-format dummy

HTTP load comes from ``--processes`` client processes (default 4) so that the load generator's own event loop
does not inflate the latencies it measures. At the deadline, streams still open are closed (that is
cancellation under load too); their tokens so far count toward throughput, not toward the latency figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Sample:
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens_in_window: int = 0
    completed: bool = False
    error: str | None = None


@dataclass
class Load:
    concurrency: int = 100
    duration_s: float = 60.0
    prompt_len: int = 256
    output_len: int = 128
    max_token_id: int = 50000
    seed: int = 0
    temperature: float = 0.0


def prompts_for(client: int, load: Load):
    """Each client draws its own prompts from its own seeded stream: reproducible and distinct."""
    rng = random.Random(load.seed * 1_000_003 + client)
    while True:
        yield [rng.randint(0, load.max_token_id) for _ in range(load.prompt_len)]


def _token_times_to_sample(start: float, times: list[float], deadline: float, completed: bool) -> Sample:
    s = Sample(completed=completed, tokens_in_window=sum(1 for t in times if t <= deadline))
    if times:
        s.ttft_s = times[0] - start
        if completed and len(times) > 1:
            s.tpot_s = (times[-1] - times[0]) / (len(times) - 1)
    return s


# ---------------------------------------------------------------------- HTTP
async def _http_client(idx: int, load: Load, url: str, model: str, t_end: float, samples: list[Sample]) -> None:
    import aiohttp

    gen = prompts_for(idx, load)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.perf_counter() < t_end:
            body = {"model": model, "prompt": next(gen), "max_tokens": load.output_len, "ignore_eos": True,
                    "temperature": load.temperature, "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            times: list[float] = []
            usage_tokens, error, cut = None, None, False
            try:
                async with session.post(f"{url}/v1/completions", json=body) as r:
                    if r.status != 200:
                        error = f"HTTP {r.status}: {(await r.text())[:200]}"
                    else:
                        # Token events are only counted (one engine step of one sequence = one token); just the
                        # usage and error events are decoded, so the client spends little per event.
                        async for raw in r.content:
                            now = time.perf_counter()
                            if not raw.startswith(b"data: "):
                                continue
                            if raw.startswith(b"data: [DONE]"):
                                break
                            if raw.startswith(b'data: {"error"'):
                                error = json.loads(raw[6:])["error"]["message"][:200]
                                break
                            if b'"choices":[]' in raw:
                                usage_tokens = json.loads(raw[6:])["usage"]["completion_tokens"]
                                continue
                            if now >= t_end:  # the window is over: close the stream mid-flight
                                cut = True
                                break
                            times.append(now)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                error = f"{type(e).__name__}: {e}"[:200]
            completed = error is None and not cut and usage_tokens == len(times) == load.output_len
            if error is None and not cut and not completed:
                error = f"incomplete stream: {len(times)} token events, usage {usage_tokens}"
            sample = _token_times_to_sample(start, times, t_end, completed)
            sample.error = error
            samples.append(sample)


def _http_process(args: tuple) -> list[dict]:
    indices, load, url, model, t_end = args

    async def run() -> list[Sample]:
        samples: list[Sample] = []
        await asyncio.gather(*(_http_client(i, load, url, model, t_end, samples) for i in indices))
        return samples

    return [asdict(s) for s in asyncio.run(run())]


def run_http(load: Load, url: str, processes: int) -> tuple[list[Sample], float, str]:
    import urllib.request

    model = json.load(urllib.request.urlopen(f"{url}/v1/models"))["data"][0]["id"]
    # Everyone shares one wall-clock deadline (perf_counter is system-wide on Linux).
    t_start = time.perf_counter() + 1.0
    t_end = t_start + load.duration_s
    shards = [list(range(load.concurrency))[p::processes] for p in range(processes)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        while time.perf_counter() < t_start:
            time.sleep(0.01)
        results = pool.map(_http_process, [(s, load, url, model, t_end) for s in shards if s])
    return [Sample(**d) for chunk in results for d in chunk], load.duration_s, model


# ---------------------------------------------------------------------- in process
def run_in_process(load: Load, config: str, overrides: dict) -> tuple[list[Sample], float, str, str]:
    from engine import AsyncLLM, EngineConfig, SamplingParams

    cfg = EngineConfig.from_yaml(config, **overrides)
    llm = AsyncLLM(cfg)
    params = SamplingParams(max_tokens=load.output_len, ignore_eos=True, temperature=load.temperature)

    async def client(idx: int, t_end: float, samples: list[Sample]) -> None:
        gen = prompts_for(idx, load)
        n = 0
        while time.perf_counter() < t_end:
            start, times, completed = time.perf_counter(), [], False
            agen = llm.generate(next(gen), params, request_id=f"w4-{idx}-{n}")
            n += 1
            try:
                async for out in agen:
                    now = time.perf_counter()
                    if now >= t_end:
                        break
                    times += [now] * len(out.outputs[0].token_ids) if out.outputs else []
                    completed = out.finished
            finally:
                await agen.aclose()  # aborts the request if the window closed mid-stream
            samples.append(_token_times_to_sample(start, times, t_end, completed))

    async def run() -> list[Sample]:
        # Warm up (first CUDA graphs, allocator) outside the window.
        warm = llm.generate([1] * load.prompt_len, SamplingParams(max_tokens=4, ignore_eos=True), request_id="warm")
        async for _ in warm:
            pass
        samples: list[Sample] = []
        t_end = time.perf_counter() + load.duration_s
        await asyncio.gather(*(client(i, t_end, samples) for i in range(load.concurrency)))
        return samples

    dtype = str(llm.engine.runner.dtype).removeprefix("torch.")
    return asyncio.run(run()), load.duration_s, cfg.model, dtype


# ---------------------------------------------------------------------- report
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(samples: list[Sample], duration_s: float) -> dict:
    ttft = [s.ttft_s * 1000 for s in samples if s.ttft_s is not None and s.error is None]
    tpot = [s.tpot_s * 1000 for s in samples if s.tpot_s is not None and s.error is None]
    errors = [s.error for s in samples if s.error is not None]
    finished = sum(1 for s in samples if s.completed)
    r = lambda v: None if v is None else round(v, 2)  # noqa: E731
    return {
        "out_tok_s": round(sum(s.tokens_in_window for s in samples) / duration_s, 1),
        "ttft_ms_p50": r(percentile(ttft, 0.5)), "ttft_ms_p99": r(percentile(ttft, 0.99)),
        "tpot_ms_p50": r(percentile(tpot, 0.5)), "tpot_ms_p99": r(percentile(tpot, 0.99)),
        "ttft_ms_mean": r(statistics.fmean(ttft)) if ttft else None,
        "requests_completed": finished, "requests": len(samples), "errors": len(errors),
        "error_pct": round(100 * len(errors) / max(len(samples), 1), 3),
        "error_examples": sorted(set(errors))[:5],
    }


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).resolve().parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="W4: online serving, closed-loop streaming clients")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="the service, e.g. http://127.0.0.1:8000")
    mode.add_argument("--in-process", action="store_true", help="drive AsyncLLM in this process instead")
    p.add_argument("--config", default="configs/gpt2xl.yaml", help="--in-process: engine settings from this file")
    p.add_argument("--load-format", help="--in-process: override load_format (e.g. dummy)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="--in-process: override an engine field (repeatable), e.g. --set model=/tmp/gpt2-tiny")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-token-id", type=int, default=50000, help="prompt ids are drawn from 0..this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=4, help="HTTP client processes")
    p.add_argument("--dtype", help="recorded in the result (--in-process: the config's)")
    p.add_argument("--out", help="append the record to this JSON list")
    args = p.parse_args(argv)

    load = Load(args.concurrency, args.duration, args.prompt_len, args.output_len, args.max_token_id, args.seed)
    if args.in_process:
        import yaml

        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
        if args.load_format:
            overrides["load_format"] = args.load_format
        samples, duration, model, dtype = run_in_process(load, args.config, overrides)
        path = "in-process AsyncLLM"
    else:
        samples, duration, model = run_http(load, args.url.rstrip("/"), max(1, min(args.processes, args.concurrency)))
        path, dtype = "HTTP via Ray Serve", args.dtype or "float16"
    record = {"workload": "W4", "engine": "ours", "path": path, "model": model, "dtype": dtype,
              "device": _device_name(), "commit": _git_commit(), "concurrency": load.concurrency,
              "duration_s": duration, "prompt_tokens": load.prompt_len, "output_tokens": load.output_len,
              **summarize(samples, duration), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(record, indent=2))
    if args.out:
        out = Path(args.out)
        records = json.loads(out.read_text()) if out.exists() else []
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records + [record], indent=2) + "\n")
    if record["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
