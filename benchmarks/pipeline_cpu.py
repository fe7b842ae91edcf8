"""Pipeline parallelism on CPUs: does cutting a step into micro-batches make the stages work at once?

    python -m gpt2serve.benchmarks.pipeline_cpu --out benchmarks/results/<date>_pipeline_cpu.json

A GPT-2-shaped checkpoint with random weights (8 blocks, ``--width`` 1024, built by ``engine.tiny_model``) serves one
batch of requests (``--requests`` prompts of ``--prompt-tokens``, ``--output-tokens`` each, greedy, EOS
ignored), first in one process, then split over 2 pipeline stages (2 processes over gloo) with 1, 2 and 4
micro-batches per step. Every process gets one thread (``OMP_NUM_THREADS=1``, set before torch starts), so
each stage is one core, as each would be one GPU: the single process is one "device" doing all 8 blocks, and
2 stages can at best double its throughput, and only if they work at once. With one micro-batch they take
turns (stage 1 waits for stage 0's whole step, then stage 0 waits for the sampled tokens), so the pair is no
faster than one process. Outputs must equal the single process's token for token (else the run fails).
Needs a machine with at least 2 cores and nothing else running; the figures are CPU-bound, the method is the
same as on GPUs, where the stages are NCCL ranks.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: the follower processes inherit it too

import argparse  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from gpt2serve.benchmarks.offline import git_commit, log, write_results  # noqa: E402
from gpt2serve import LLM, EngineConfig, SamplingParams  # noqa: E402
from gpt2serve.engine.tiny_model import build_tiny_checkpoint  # noqa: E402


def run(model_dir: Path, prompts: list[list[int]], new: int, **parallel) -> tuple[dict[str, Any], list[list[int]]]:
    llm = LLM(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", num_gpu_blocks=1024, block_size=16,
                           max_num_seqs=len(prompts), max_num_batched_tokens=2048, **parallel))
    engine = llm.engine
    try:
        llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4, temperature=0,
                                                                                  ignore_eos=True))  # warm-up
        steps_before = engine.runner.timing["steps"]
        start = time.perf_counter()
        outputs = llm.generate(prompt_token_ids=prompts,
                               sampling_params=SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        wall = time.perf_counter() - start
        steps = engine.runner.timing["steps"] - steps_before
        assert engine.kv.all_free(), engine.stats()
    finally:
        engine.shutdown()
    tokens = [out.outputs[0].token_ids for out in outputs]
    return {"wall_s": round(wall, 3), "steps": steps, "out_tok_s": round(len(prompts) * new / wall, 1)}, tokens


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--micro-batches", default="1,2,4")
    p.add_argument("--width", type=int, default=1024, help="the model's hidden size (8 blocks, 64-wide heads)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    common = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
              "threads_per_process": 1, "model": f"GPT-2 shape, 8 blocks, width {args.width}, {args.width // 64} heads, random weights",
              "requests": args.requests, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_checkpoint(Path(tmp) / "gpt2", n_layer=8, n_embd=args.width, n_head=args.width // 64)
        rec, want = run(model_dir, prompts, args.output_tokens)
        records.append({**common, "stages": 1, "micro_batches": 1, **rec, "vs_one_process": 1.0})
        log(f"one process: {rec}")
        for m in (int(x) for x in args.micro_batches.split(",")):
            rec, got = run(model_dir, prompts, args.output_tokens, pipeline_parallel_size=2, pipeline_micro_batches=m)
            if got != want:
                raise SystemExit(f"pipeline with {m} micro-batches changed the output")
            rec["vs_one_process"] = round(rec["out_tok_s"] / records[0]["out_tok_s"], 3)
            records.append({**common, "stages": 2, "micro_batches": m, **rec})
            log(f"2 stages, {m} micro-batches: {rec}")
            write_results(records, args.out, markdown)
    write_results(records, args.out, markdown)
    return records


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| stages | micro-batches | steps | wall s | out tok/s | vs one process (ceiling 2.0) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['stages']} | {r['micro_batches']} | {r['steps']} | {r['wall_s']} | {r['out_tok_s']} | "
                     f"{r['vs_one_process']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
