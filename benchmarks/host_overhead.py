"""The engine's host (CPU) time per decode step, with the model replaced by a stub: schedule, prepare, update.

    python -m gpt2serve.benchmarks.host_overhead [--seqs 512] [--steps 60] [--profile]

A decode step at large batch is bounded below by this Python work unless it overlaps the GPU's; it is measured
apart from the model so that it can be tracked on any machine (the tiny checkpoint, CPU, a stub forward that
returns zeros and random logits). W5's shape: every sequence shares a 320-token prefix (the tiny model's context is
shorter than W5's 576) plus 64 tokens of its own, prefix caching on.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import random
import tempfile
import time

import torch


class StubModel(torch.nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, ids, positions, kv_caches, meta):
        return torch.zeros(ids.shape[0], 8)

    def compute_logits(self, hidden):
        return torch.randn(hidden.shape[0], self.vocab_size)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--profile", action="store_true", help="print the functions with the most own time")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from gpt2serve import EngineConfig, LLMEngine, SamplingParams
    from gpt2serve.engine.tiny_model import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint(tempfile.mkdtemp() + "/tiny")
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", num_gpu_blocks=20000,
                                    max_num_seqs=args.seqs, max_num_batched_tokens=16384))
    engine.runner.model = StubModel(engine.vocab_size)
    rng = random.Random(5)
    vocab = engine.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(320)]
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0, ignore_eos=True, detokenize=False)
    for i in range(args.seqs):
        engine.add_request(f"r{i}", prefix + [rng.randrange(vocab) for _ in range(64)], params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()  # prefill
    phases0, runner0 = dict(engine._timing), dict(engine.runner.timing)
    gc0 = [s["collections"] for s in gc.get_stats()]
    prof = cProfile.Profile()
    if args.profile:
        prof.enable()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    elapsed = time.perf_counter() - start
    prof.disable()
    ms = lambda new, old: round((new - old) * 1000 / args.steps, 3)  # noqa: E731
    result = {
        "seqs": args.seqs, "steps": args.steps, "step_ms": round(elapsed * 1000 / args.steps, 3),
        **{k.removesuffix("_s") + "_ms": ms(v, phases0[k]) for k, v in engine._timing.items()},
        **{k.removesuffix("_s") + "_ms": ms(v, runner0[k]) for k, v in engine.runner.timing.items() if k != "steps"},
        "gc_collections": [s["collections"] - c for s, c in zip(gc.get_stats(), gc0)],
        "note": "forward_ms and sample_ms include the stub's own torch work (zeros, randn of [seqs, vocab], argmax)",
    }
    print(json.dumps(result))
    if args.profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
