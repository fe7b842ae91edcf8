"""Where a decode step's time goes: kernel table of GPT-2 XL decode steps (torch.profiler), eager and graphed.

Usage: python -m gpt2serve.benchmarks.profile_decode --batch 1 --context 256 [--batch 256 --context 384] --out FILE.txt
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gpt2serve import EngineConfig, LLMEngine, SamplingParams


def profile_decode(batch: int, context: int, eager: bool, steps: int = 20) -> str:
    engine = LLMEngine(EngineConfig(model="gpt2-xl", load_format="dummy", dtype="float16", device="cuda",
                                    enforce_eager=eager, max_num_seqs=max(batch, 1), max_num_batched_tokens=8192))
    params = SamplingParams(max_tokens=steps * 3 + 10, temperature=0, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(f"r{i}", [(i * 7 + j) % 50000 for j in range(context)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_ms = 1000 * (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sum(e.count for e in events) / steps
    gpu_ms = sum(e.self_device_time_total for e in events) / steps / 1000
    head = (f"\n=== batch {batch}, context {context}, {'eager' if eager else 'CUDA graphs'}: wall {step_ms:.3f} ms "
            f"per step, GPU kernel time {gpu_ms:.3f} ms per step, {kernels:.0f} kernels per step ===\n")
    del engine
    torch.cuda.empty_cache()
    return head + table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--context", type=int, action="append")
    parser.add_argument("--out")
    args = parser.parse_args()
    report = ""
    for batch, context in zip(args.batch or [1], args.context or [256]):
        for eager in (True, False):
            part = profile_decode(batch, context, eager)
            print(part.splitlines()[1], flush=True)
            report += part
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
