"""How often greedy output of the fp16 Triton path agrees with the fp16 and fp32 PyTorch-reference paths.

fp16 rounding differs between two correct implementations (different summation orders), so greedy output
can legitimately diverge once two logits are within rounding of each other; this measures how often.
Usage: python -m gpt2serve.benchmarks.fp16_agreement --out results.json   (needs a GPU; builds its own tiny model)
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile

from gpt2serve import LLM, EngineConfig, SamplingParams
from gpt2serve.engine.tiny_model import build_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    model_dir = build_tiny_checkpoint(tempfile.mkdtemp() + "/tiny", n_layer=4, n_embd=256, n_head=4, vocab_size=2048)
    rng = random.Random(7)
    prompts = [[rng.randrange(2000) for _ in range(rng.randint(1, 300))] for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    outputs = {}
    for name, backend, dtype in [("ref-fp32", "torch", "float32"), ("ref-fp16", "torch", "float16"),
                                 ("triton-fp32", "triton", "float32"), ("triton-fp16", "triton", "float16")]:
        llm = LLM(EngineConfig(model=str(model_dir), device="cuda", dtype=dtype, attention_backend=backend,
                               num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=1024))
        outputs[name] = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]

    def agreement(a, b):
        same_seq = sum(x == y for x, y in zip(outputs[a], outputs[b]))
        prefix = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(outputs[a], outputs[b])]
        return {"pair": f"{a} vs {b}", "identical_sequences": same_seq, "of": len(prompts),
                "mean_common_prefix_tokens": sum(prefix) / len(prefix), "tokens_per_sequence": 64}

    report = [agreement("triton-fp32", "ref-fp32"), agreement("triton-fp16", "ref-fp16"),
              agreement("ref-fp16", "ref-fp32"), agreement("triton-fp16", "ref-fp32")]
    for r in report:
        print(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
