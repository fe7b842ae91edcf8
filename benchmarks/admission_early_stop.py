"""Admission on a load whose requests stop early: KV reserved for max_tokens, for a quantile, or for the mean of
the output lengths the service really sees (``kv_reserve_output``, docs/serving-path.md).

    python -m gpt2serve.benchmarks.admission_early_stop --out benchmarks/results/2026-12-07_admission-early-stop_cpu.json

The tiny checkpoint (2 layers) on the CPU, one worker with a small KV pool (``--blocks`` of 16 tokens), so that
the pool and not the sequence slots limits how many requests run. ``--clients`` closed-loop clients each send a
16-token prompt with ``max_tokens`` 480 (EOS ignored) and stop reading after an output length drawn uniformly
from 16..480, as requests that end at EOS or a stop string would (the client closes the stream; the engine frees
the request's blocks and the scheduler its reservation). Per variant: output tokens/s received, requests done,
the mean number of requests the worker ran at once, and the engine's preemptions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from gpt2serve.engine.distributed import free_port

VARIANTS = ("max_tokens", "p95", "mean")


async def client(idx: int, url: str, args, t_end: float, rows: list[dict]) -> None:
    import httpx

    rng = random.Random(idx)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while time.monotonic() < t_end:
            target = rng.randint(16, args.max_tokens)
            body = {"prompt": [rng.randrange(512) for _ in range(16)], "max_tokens": args.max_tokens,
                    "ignore_eos": True, "stream": True}
            start, first, got = time.monotonic(), None, 0
            async with c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    rows.append({"error": r.status_code})
                    await asyncio.sleep(0.1)
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    got += 1
                    first = first or time.monotonic()
                    if got >= target or time.monotonic() >= t_end:
                        break  # the request "stops" here: closing the stream ends it on the server
            rows.append({"tokens": got, "target": target, "ttft_s": (first or time.monotonic()) - start,
                         "done": got >= target, "end": time.monotonic()})


def measure(variant: str, model: str, args) -> dict:
    from ray import serve

    from gpt2serve import serve_app

    port = free_port()
    quarter = {"ray_actor_options": {"num_cpus": 0.25}}
    name = f"admission-{variant.replace('_', '-')}"
    serve.run(serve_app.build_app({
        "engine": {"model": model, "device": "cpu", "dtype": "float32", "num_gpu_blocks": args.blocks,
                   "block_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 512, "swap_space_gib": 0.05,
                   "enable_prefix_caching": False},
        "served_model_name": "tiny", "kv_reserve_output": variant, "max_queued_requests": 256,
        "heartbeat_interval_s": 0.2, "http_listener": {"host": "127.0.0.1", "port": port},
        "ingress": quarter, "scheduler": quarter, "worker": quarter}), name=name, route_prefix=f"/{name}")
    scheduler = serve.get_deployment_handle("Scheduler", app_name=name)
    worker = serve.get_deployment_handle("ModelWorker", app_name=name)
    while not scheduler.snapshot.remote().result()["workers"]:
        time.sleep(0.2)
    (wid,) = scheduler.snapshot.remote().result()["workers"]

    def stats() -> dict:
        return worker.stats.remote(replica=wid).result()

    rows: list[dict] = []
    samples: list[int] = []
    before = stats()

    async def run() -> None:
        t_end = time.monotonic() + args.seconds
        load = asyncio.gather(*(client(i, f"http://127.0.0.1:{port}", args, t_end, rows)
                                for i in range(args.clients)))
        while time.monotonic() < t_end:
            await asyncio.sleep(0.25)
            if time.monotonic() > t_end - args.seconds + args.warmup_s:
                samples.append((await asyncio.to_thread(stats))["num_running"])
        await load

    asyncio.run(run())
    after = stats()
    serve.delete(name)
    window = [r for r in rows if "tokens" in r]
    preempted = sum(after.get(k, 0) - before.get(k, 0) for k in ("preemptions_recompute", "preemptions_swap"))
    return {"kv_reserve_output": variant, "clients": args.clients, "seconds": args.seconds,
            "pool_tokens": args.blocks * 16, "max_tokens": args.max_tokens,
            "out_tok_s": round(sum(r["tokens"] for r in window) / args.seconds, 1),
            "requests_done": sum(1 for r in window if r["done"]),
            "errors": sum(1 for r in rows if "error" in r),
            "mean_running": round(statistics.fmean(samples), 2) if samples else None,
            "preemptions": preempted,
            "ttft_ms_p50": round(1000 * statistics.median(r["ttft_s"] for r in window), 1) if window else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--warmup-s", type=float, default=10.0, help="running counts are sampled after this")
    p.add_argument("--blocks", type=int, default=128, help="KV pool of the worker, in 16-token blocks")
    p.add_argument("--max-tokens", type=int, default=480)
    p.add_argument("--model", help="a checkpoint; default: the tiny one, built in a temporary directory")
    p.add_argument("--out", help="write the rows (JSON) here")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from gpt2serve.engine.tiny_model import build_tiny_checkpoint

    model = args.model or str(build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        rows = [measure(v, model, args) for v in args.variants.split(",")]
    finally:
        ray.shutdown()
    base = rows[0]["out_tok_s"] or 1
    print("| kv_reserve_output | out tok/s | vs max_tokens | requests done | mean running | preemptions | "
          "TTFT p50 ms |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_reserve_output']} | {r['out_tok_s']} | {r['out_tok_s'] / base:.2f} | {r['requests_done']} | "
              f"{r['mean_running']} | {r['preemptions']} | {r['ttft_ms_p50']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
