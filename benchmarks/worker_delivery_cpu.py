"""What one engine step's deltas cost the model worker's event loop: a task per request (each consuming
``AsyncLLM.generate``, as the worker did) against one pass of callbacks after the step (``AsyncLLM.add_request``,
as it does now). docs/serving-path.md says why it matters: that loop shares the GIL with the step thread.

    python -m gpt2serve.benchmarks.worker_delivery_cpu --out benchmarks/results/2026-12-07_worker-delivery_cpu.json

The engine is a stand-in without a model (each step sleeps ``--step-ms``, as if waiting for the GPU, then gives
every running request one token), so that only the delivery is measured: the event loop's own CPU time
(``time.thread_time`` of the thread running it) per request per step, each delta packed into a channel's outbox
as the worker does (``actors.protocol.pack_output``, ``actors.worker.Outbox``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from gpt2serve.actors.protocol import pack_output
from gpt2serve.actors.worker import Outbox
from gpt2serve.engine.async_llm import AsyncLLM
from gpt2serve.engine.outputs import CompletionOutput, RequestOutput
from gpt2serve.engine.sampling_params import SamplingParams


class StandInEngine:
    """LLMEngine's streaming surface without a model: every step, one token for each running request."""

    def __init__(self, step_s: float):
        self.step_s = step_s
        self.live: dict[str, list[int]] = {}  # request id -> [max_tokens, tokens so far]

    def make_request(self, request_id, prompt, params, priority=0, stream=True, lora_name=None):
        return request_id, params.max_tokens

    def submit(self, request_id, max_tokens):
        self.live[request_id] = [max_tokens, 0]

    def abort(self, request_id):
        self.live.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        outputs = []
        for request_id, progress in list(self.live.items()):
            progress[1] += 1
            finished = progress[1] >= progress[0]
            outputs.append(RequestOutput(request_id, None, [], None, [CompletionOutput(
                0, " tok", [42], None, None, "length" if finished else None)], finished))
            if finished:
                del self.live[request_id]
        return outputs


async def task_per_request(llm: AsyncLLM, box: Outbox, n: int, params: SamplingParams) -> None:
    async def run(request_id: str) -> None:
        async for out in llm.generate([1, 2, 3], params, request_id=request_id):
            box.put(request_id, pack_output(out))

    await asyncio.gather(*(run(f"r{i}") for i in range(n)))


async def callbacks(llm: AsyncLLM, box: Outbox, n: int, params: SamplingParams) -> None:
    left = asyncio.get_running_loop().create_future()
    remaining = [n]

    def deliver(request_id: str, out) -> None:
        box.put(request_id, pack_output(out))
        if out.finished:
            remaining[0] -= 1
            if not remaining[0]:
                left.set_result(None)

    for i in range(n):
        llm.add_request(f"r{i}", [1, 2, 3], params, lambda out, rid=f"r{i}": deliver(rid, out))
    await left


def measure(mode, n: int, tokens: int, step_s: float) -> dict:
    llm = AsyncLLM(StandInEngine(step_s))
    box = Outbox()
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)

    async def run() -> tuple[float, float]:
        cpu, wall = time.thread_time(), time.perf_counter()
        await mode(llm, box, n, params)
        return time.thread_time() - cpu, time.perf_counter() - wall

    cpu_s, wall_s = asyncio.run(run())
    assert len(box.items) == n * tokens
    return {"cpu_s": cpu_s, "wall_s": wall_s, "loop_cpu_us_per_request_step": 1e6 * cpu_s / (n * tokens)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    for name, mode in (("task per request", task_per_request), ("callbacks after the step", callbacks)):
        runs = [measure(mode, args.requests, args.tokens, args.step_ms / 1000) for _ in range(args.repeats)]
        us = statistics.median(r["loop_cpu_us_per_request_step"] for r in runs)
        rows.append({"delivery": name, "requests": args.requests, "tokens": args.tokens, "step_ms": args.step_ms,
                     "repeats": args.repeats, "loop_cpu_us_per_request_step_median": round(us, 2),
                     "loop_cpu_ms_per_step_median": round(us * args.requests / 1000, 3), "runs": runs})
        print(f"{name}: {us:.2f} µs of event-loop CPU per request per step "
              f"({us * args.requests / 1000:.3f} ms per step of {args.requests} requests)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
