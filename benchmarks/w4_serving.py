"""W4 of benchmarks/README.md: online serving, 100 concurrent streaming clients in a closed loop for 60 s.

Each client sends a 256-token prompt of random ids (``random.Random(seed)`` over 0..50000), asks for 128 tokens
with ``ignore_eos``, reads the SSE stream to the end, and sends the next one at once. Reported: TTFT p50/p99,
TPOT p50/p99 (per request: time from first to last token over tokens - 1), output tok/s (tokens received inside
the window over its length), and errors.

    # against the service, through Serve's HTTP proxy (port 8000)
    GPT2SERVE_LOAD_FORMAT=dummy serve run configs/gpt2xl.yaml
    python benchmarks/w4_serving.py --url http://127.0.0.1:8000 --out benchmarks/results/w4.json
    # straight to the ingress replicas (Serve's direct ingress: each replica serves HTTP on its own port from
    # 30000 up, found with --direct-ingress), which skips the proxy's Ray hop for every SSE chunk
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1 GPT2SERVE_LOAD_FORMAT=dummy serve run configs/gpt2xl.yaml
    python benchmarks/w4_serving.py --direct-ingress
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
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
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
            # A server may put several tokens in one event (vLLM's stream_interval, say): the usage event counts
            # them, and each event then stands for its share of the tokens.
            completed = (error is None and not cut and usage_tokens == load.output_len
                         and 0 < len(times) <= usage_tokens)
            if error is None and not cut and not completed:
                error = f"incomplete stream: {len(times)} token events, usage {usage_tokens}"
            sample = _token_times_to_sample(start, times, t_end, completed)
            if completed and len(times) < usage_tokens:
                sample.tokens_in_window = round(usage_tokens * sample.tokens_in_window / len(times))
                sample.tpot_s = (times[-1] - times[0]) / (usage_tokens - 1) if len(times) > 1 else None
            sample.error = error
            samples.append(sample)


def _http_process(args: tuple) -> list[dict]:
    indices, load, urls, model, t_end = args

    async def run() -> list[Sample]:
        samples: list[Sample] = []
        # Client i always talks to the same endpoint, so load spreads evenly over the ingress replicas.
        await asyncio.gather(*(_http_client(i, load, urls[i % len(urls)], model, t_end, samples) for i in indices))
        return samples

    return [asdict(s) for s in asyncio.run(run())]


def discover_direct_ingress(host: str = "127.0.0.1", ports: range = range(30000, 30064)) -> list[str]:
    """The ingress replicas serving HTTP themselves (RAY_SERVE_ENABLE_DIRECT_INGRESS=1), by probing their ports."""
    import urllib.request

    found = []
    for port in ports:
        try:
            models = json.load(urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=0.5))
        except (OSError, ValueError):
            continue
        if models.get("data", [{}])[0].get("owned_by") == "gpt2-serve":  # ours, not some other service
            found.append(f"http://{host}:{port}")
    if not found:
        raise SystemExit(f"no direct-ingress replica answered on {host}:{ports.start}-{ports.stop - 1}")
    return found


def run_http(load: Load, urls: list[str], processes: int) -> tuple[list[Sample], float, str]:
    import urllib.request

    model = json.load(urllib.request.urlopen(f"{urls[0]}/v1/models"))["data"][0]["id"]
    # Everyone shares one wall-clock deadline (perf_counter is system-wide on Linux).
    t_start = time.perf_counter() + 1.0
    t_end = t_start + load.duration_s
    shards = [list(range(load.concurrency))[p::processes] for p in range(processes)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        while time.perf_counter() < t_start:
            time.sleep(0.01)
        results = pool.map(_http_process, [(s, load, urls, model, t_end) for s in shards if s])
    return [Sample(**d) for chunk in results for d in chunk], load.duration_s, model


# ---------------------------------------------------------------------- in process
def _wait_for_free_gpu(timeout_s: float = 120, fraction: float = 0.9) -> None:
    """After --serve, the worker process may still be letting go of its KV pool; the engine sizes its pool from
    free memory, so wait for it rather than measure a smaller pool."""
    import torch

    if not torch.cuda.is_available():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free >= fraction * total:
            return
        time.sleep(2)
    print(f"warning: only {free / 2**30:.1f} of {total / 2**30:.1f} GiB GPU memory free", file=sys.stderr)


def run_in_process(load: Load, config: str, overrides: dict,
                   timing: dict | None = None) -> tuple[list[Sample], float, str, str]:
    """``timing``: filled with the engine's ``step_timing()`` over the run (host and device ms per step)."""
    from gpt2serve import AsyncLLM, EngineConfig, SamplingParams

    _wait_for_free_gpu()
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
    samples = asyncio.run(run())
    if timing is not None:
        timing.update(llm.engine.step_timing())
    return samples, load.duration_s, cfg.model, dtype


# ---------------------------------------------------------------------- the service, started here
class ServeProcess:
    """``serve run CONFIG`` in its own process group: started, waited for, and stopped with everything it
    started (Ray's local cluster included), so that the GPU is free again for the in-process run."""

    def __init__(self, config: str, env: dict[str, str], log_path: str, timeout_s: float = 600):
        self.log = open(log_path, "w")
        serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
        cmd = [serve_bin if os.path.exists(serve_bin) else "serve", "run", config]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.timeout_s = timeout_s

    def wait_ready(self, urls) -> list[str]:
        import urllib.request

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve run exited with {self.proc.returncode}; see {self.log.name}")
            try:
                found = urls()
                if json.load(urllib.request.urlopen(f"{found[0]}/health", timeout=2)).get("workers"):
                    return found
            except (OSError, SystemExit, ValueError):
                pass
            time.sleep(2)
        raise SystemExit(f"the service was not ready within {self.timeout_s:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                time.sleep(5)  # the raylet and workers leave after the driver
                return
            except subprocess.TimeoutExpired:
                continue


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
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--url", help="the service, e.g. http://127.0.0.1:8000 (several: comma-separated)")
    mode.add_argument("--direct-ingress", action="store_true", help="find the ingress replicas' own HTTP ports")
    mode.add_argument("--in-process", action="store_true", help="drive AsyncLLM in this process instead")
    p.add_argument("--serve", metavar="CONFIG", help="start `serve run CONFIG` first (and stop it after)")
    p.add_argument("--in-process-too", action="store_true", help="after the HTTP run, the same load in process")
    p.add_argument("--config", default="configs/gpt2xl.yaml", help="--in-process: engine settings from this file")
    p.add_argument("--load-format", help="--serve / --in-process: override load_format (e.g. dummy)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="--serve / --in-process: override an engine field (repeatable), e.g. --set max_num_seqs=128")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-token-id", type=int, default=50000, help="prompt ids are drawn from 0..this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=4, help="HTTP client processes")
    p.add_argument("--dtype", help="recorded in the result (--in-process: the config's)")
    p.add_argument("--out", help="append the records to this JSON list")
    p.add_argument("--serve-log", default="/tmp/w4_serve.log", help="--serve: where `serve run` writes")
    args = p.parse_args(argv)

    load = Load(args.concurrency, args.duration, args.prompt_len, args.output_len, args.max_token_id, args.seed)
    overrides = {k: yaml_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.load_format:
        overrides["load_format"] = args.load_format
    records = []
    if args.in_process and not args.serve:
        records.append(in_process_record(load, args.config, overrides))
    else:
        if not (args.url or args.direct_ingress or args.serve):
            p.error("one of --url, --direct-ingress, --serve or --in-process is needed")
        server = None
        if args.serve:
            # Engine overrides reach build_app through GPT2SERVE_* (serve run ignores arguments after a config).
            env = {f"GPT2SERVE_{k.upper()}": str(v) for k, v in overrides.items()}
            env.setdefault("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))  # our own local cluster
            if args.direct_ingress:
                env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
            server = ServeProcess(args.serve, env, log_path=args.serve_log)
        try:
            def find() -> list[str]:
                if args.direct_ingress:
                    return discover_direct_ingress()
                return [u.rstrip("/") for u in (args.url or "http://127.0.0.1:8000").split(",")]

            urls = server.wait_ready(find) if server else find()
            samples, duration, model = run_http(load, urls, max(1, min(args.processes, args.concurrency)))
        finally:
            if server:
                server.stop()
        path = f"HTTP, {'direct ingress' if args.direct_ingress else 'Serve proxy'}, {len(urls)} endpoint(s)"
        records.append(record(load, path, model, args.dtype or "float16", samples, duration))
        if args.in_process_too:
            records.append(in_process_record(load, args.serve or args.config, overrides))
    if len(records) == 2:
        records[0]["out_tok_s_vs_in_process"] = round(records[0]["out_tok_s"] / max(records[1]["out_tok_s"], 1e-9), 3)
    print(json.dumps(records, indent=2))
    for r in records:
        print(f"{r['path']}: {r['out_tok_s']} out tok/s, TTFT p50/p99 {r['ttft_ms_p50']}/{r['ttft_ms_p99']} ms, "
              f"TPOT p50/p99 {r['tpot_ms_p50']}/{r['tpot_ms_p99']} ms, errors {r['errors']}/{r['requests']}",
              file=sys.stderr)
    if len(records) == 2:
        r = records[0]
        print(f"targets: out tok/s {r['out_tok_s_vs_in_process']:.0%} of in-process (>= 85%), TTFT p50 "
              f"{r['ttft_ms_p50']} ms (<= 100), TPOT p50 {r['tpot_ms_p50']} ms (<= 20), errors {r['errors']} (0)",
              file=sys.stderr)
    if args.out:
        out = Path(args.out)
        existing = json.loads(out.read_text()) if out.exists() else []
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(existing + records, indent=2) + "\n")
    if any(r["errors"] for r in records):
        sys.exit(1)


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def record(load: Load, path: str, model: str, dtype: str, samples: list[Sample], duration: float) -> dict:
    return {"workload": "W4", "engine": "ours", "path": path, "model": model, "dtype": dtype,
            "device": _device_name(), "commit": _git_commit(), "concurrency": load.concurrency,
            "duration_s": duration, "prompt_tokens": load.prompt_len, "output_tokens": load.output_len,
            **summarize(samples, duration), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}


def in_process_record(load: Load, config: str, overrides: dict) -> dict:
    samples, duration, model, dtype = run_in_process(load, config, overrides)
    return record(load, "in-process AsyncLLM", model, dtype, samples, duration)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
