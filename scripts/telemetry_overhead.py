"""What the metrics cost the worker: host time per recorder call, and engine throughput with and without them.

    python scripts/telemetry_overhead.py [--ray] [--out loadtests/results/<dir>/overhead.json]

1. Per call (synthetic inputs, no engine): ``on_output`` for a decode delta, ``on_step`` for a step of 64
   requests, ``tick``; with the prometheus_client backend, and with Ray's too when ``--ray`` (starts a local Ray).
2. The tiny model's engine in this process (``AsyncLLM``), 16 concurrent streams of 64 tokens, with the recorder
   and step observer wired as the worker wires them, against none; rounds alternate, medians reported.
On the CPU machines only the ratio of (2) means anything for a GPU run; (1) is host CPU time, which a GPU
worker pays too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")


def per_call_us(backend) -> dict[str, float]:
    from gpt2serve.engine.metrics import Cost, ServingMetrics, StepInfo
    from gpt2serve.engine.outputs import CompletionOutput, RequestOutput

    rec = ServingMetrics(backend, "m", "r", Cost(1, 3.0, "x"))
    n = 20000
    for i in range(64):
        rec.request_started(f"q{i}")
    delta = RequestOutput("q0", None, [1] * 256, None, [CompletionOutput(0, "x", [5], None, None)], False,
                          {"arrival_time": 0.0, "first_token_time": 0.1, "finished_time": None})
    t = time.perf_counter()
    for _ in range(n):
        rec.on_output(delta)
    out_us = (time.perf_counter() - t) / n * 1e6
    step = StepInfo(0.01, {f"q{i}": 1 for i in range(64)}, 0, 64)
    t = time.perf_counter()
    for _ in range(n // 10):
        rec.on_step(step)
    step_us = (time.perf_counter() - t) / (n // 10) * 1e6
    stats = {"num_running": 64, "num_waiting": 0, "num_swapped": 0, "kv_usage": 0.5}
    t = time.perf_counter()
    for _ in range(n // 10):
        rec.tick(stats, 0.0)
    tick_us = (time.perf_counter() - t) / (n // 10) * 1e6
    done = RequestOutput("z", None, [1] * 256, None, [CompletionOutput(0, "x", [5], None, None, "length")], True,
                         {"arrival_time": 0.0, "first_token_time": 0.1, "finished_time": 1.0})
    t = time.perf_counter()
    for i in range(n // 10):
        rec.request_started("z")
        rec.on_output(done)
    finish_us = (time.perf_counter() - t) / (n // 10) * 1e6
    return {"on_output_decode_us": round(out_us, 2), "on_step_64_requests_us": round(step_us, 2),
            "tick_us": round(tick_us, 2), "start_and_finish_request_us": round(finish_us, 2)}


def engine_rounds(model_dir: Path, rounds: int) -> dict[str, float]:
    from gpt2serve import AsyncLLM, EngineConfig, SamplingParams
    from gpt2serve.engine.metrics import Cost, PrometheusBackend, ServingMetrics, observe_steps

    cfg = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", num_gpu_blocks=512, block_size=16,
                       max_num_batched_tokens=256, max_num_seqs=16, swap_space_gib=0.05)
    params = SamplingParams(max_tokens=64, ignore_eos=True)

    async def run(llm, rec) -> float:
        async def one(i):
            rid = f"r{i}-{time.perf_counter_ns()}"
            if rec:
                rec.request_started(rid)
            async for out in llm.generate([1 + i, 2, 3, 4, 5, 6, 7, 8], params, request_id=rid):
                if rec:
                    rec.on_output(out)
            if rec:
                rec.request_ended(rid)

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(16)))
        return 16 * 64 / (time.perf_counter() - t)

    async def main():
        plain = AsyncLLM(EngineConfig(**cfg.model_dump()))
        wired = AsyncLLM(EngineConfig(**cfg.model_dump()))
        rec = ServingMetrics(PrometheusBackend(), "m", "r", Cost(1, 3.0, "x"))
        observe_steps(wired.engine, rec.on_step)
        await run(plain, None), await run(wired, rec)  # warm-up
        with_m, without = [], []
        for _ in range(rounds):
            without.append(await run(plain, None))
            with_m.append(await run(wired, rec))
        return statistics.median(without), statistics.median(with_m)

    without, with_m = asyncio.run(main())
    return {"tok_s_without_metrics": round(without, 1), "tok_s_with_metrics": round(with_m, 1),
            "ratio_with_over_without": round(with_m / without, 4), "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ray", action="store_true", help="also time the Ray backend (starts a local Ray)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from gpt2serve.engine.metrics import FanoutBackend, PrometheusBackend, RayBackend
    from gpt2serve.engine.tiny_model import build_tiny_checkpoint

    result = {"machine": f"{os.cpu_count()} CPUs", "per_call_prometheus": per_call_us(PrometheusBackend())}
    if args.ray:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

        @ray.remote
        def in_a_worker():  # ray.util.metrics record from a Ray worker process, as in a replica
            from gpt2serve.engine.metrics import FanoutBackend as F, PrometheusBackend as P, RayBackend as R

            return per_call_us(F(P(), R()))  # a function of __main__: Ray ships it by value

        result["per_call_prometheus_and_ray"] = ray.get(in_a_worker.remote())
        ray.shutdown()
    with tempfile.TemporaryDirectory() as d:
        result["engine_tiny_cpu"] = engine_rounds(build_tiny_checkpoint(Path(d) / "tiny"), args.rounds)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
