"""Scheduling and preemption policies compared on the CPU with the tiny model, in engine steps (deterministic).

Time on the 2-core CI machines says nothing about a GPU, but the number of steps a request waits does not
depend on the machine. Workload: 48 requests arriving at once, prompts of 8..200 tokens (random.Random(0)),
24 output tokens each, a 64-token step budget, 8 sequences at most, a pool of 1,536 tokens.
Usage: python -m gpt2serve.benchmarks.policies_cpu --out benchmarks/results/<name>.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

from gpt2serve import EngineConfig, LLMEngine, SamplingParams
from gpt2serve.engine.tiny_model import build_tiny_checkpoint


def run(model_dir: Path, prompts: list[list[int]], priorities: list[int], **config) -> dict:
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", block_size=16, max_num_batched_tokens=64,
                                    max_num_seqs=8, swap_space_gib=0.05, **config))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, detokenize=False)
    for i, (p, prio) in enumerate(zip(prompts, priorities)):
        engine.add_request(f"r{i}", p, params, priority=prio, stream=True)
    first, done, step = {}, {}, 0
    while engine.has_unfinished():
        outs = engine.step()
        step += 1
        for out in outs:
            if out.outputs and out.outputs[0].token_ids:
                first.setdefault(out.request_id, step)
            if out.finished:
                done[out.request_id] = step
    ttft = [first[f"r{i}"] for i in range(len(prompts))]
    high = [first[f"r{i}"] for i, p in enumerate(priorities) if p == 0]
    assert engine.kv.all_free()
    return {
        "steps": step, "mean_ttft_steps": statistics.mean(ttft), "p90_ttft_steps": sorted(ttft)[int(0.9 * len(ttft))],
        "max_ttft_steps": max(ttft), "mean_ttft_steps_priority0": statistics.mean(high),
        "mean_e2e_steps": statistics.mean(done.values()),
        **{k: v for k, v in engine.scheduler.counters.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    rng = random.Random(0)
    prompts = [[rng.randrange(500) for _ in range(rng.randint(8, 200))] for _ in range(48)]
    priorities = [0 if i % 4 == 3 else 1 for i in range(48)]  # every 4th request is urgent
    rows = []
    for name, cfg in [
        ("fcfs", dict(scheduling_policy="fcfs")),
        ("priority", dict(scheduling_policy="priority")),
        ("sjf (max_wait 1e9 s)", dict(scheduling_policy="sjf", scheduling_policy_args={"max_wait_s": 1e9})),
        ("fcfs, pool 384 tokens, recompute", dict(scheduling_policy="fcfs", num_gpu_blocks=24)),
        ("fcfs, pool 384 tokens, swap", dict(scheduling_policy="fcfs", num_gpu_blocks=24, preemption_policy="swap")),
    ]:
        cfg.setdefault("num_gpu_blocks", 96)
        rows.append({"policy": name, **run(model_dir, prompts, priorities, **cfg)})
    header = ["policy", "steps", "mean_ttft_steps", "p90_ttft_steps", "max_ttft_steps", "mean_ttft_steps_priority0",
              "preemptions_recompute", "preemptions_swap"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(round(r.get(h, 0), 1)) if not isinstance(r.get(h, 0), str) else r[h]
                                       for h in header) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
        args.out.with_suffix(".md").write_text(
            "Policies on the CPU, tiny model, 48 requests (8..200 prompt tokens, 24 out), in engine steps.\n"
            "Command: `python -m gpt2serve.benchmarks.policies_cpu --out " + str(args.out) + "`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
