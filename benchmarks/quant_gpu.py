"""Weight-only quantization on the GPU (issue 9): quality, logit error, memory, W3 TPOT and W1 throughput.

    python -m gpt2serve.benchmarks.quant_gpu --out benchmarks/results/<date>_quant_H100.json
    python -m gpt2serve.benchmarks.quant_gpu --small --out /tmp/quant.json     # CPU smoke run: tiny shapes, seconds

1. Quality: a small GPT-2 (12 x 768, GPT-2 small's shape) is trained for a fixed time on the Python standard
   library's source (``benchmarks/train_spec_pair.py``'s corpus, tokenizer and training loop; held-out files never
   trained on), saved as an ordinary checkpoint and loaded by the engine with ``quantization`` none, int8 and int4.
   Held-out perplexity is exp(mean negative log-likelihood) of 512-token windows, from the engine's own
   ``prompt_logprobs`` (every token given its prefix), so the number covers the whole quantized forward pass.
2. GPT-2 XL dummy weights (the same random dense weights for every mode: the quantized layers draw them, then
   quantize): relative error of the last-position logits of 16 prompts, ``||l_q - l_fp16|| / ||l_fp16||``, and
   the fraction of prompts whose argmax is unchanged.
3. GPT-2 XL fp16 activations: weight memory, KV tokens the pool gets, W3 TPOT and W1 output tok/s per mode, from
   ``benchmarks/offline.py`` (the same workloads and timing as every other W1 / W3 figure), one engine at a time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from gpt2serve.benchmarks.offline import device_name, git_commit, write_results

MODES = ("none", "int8", "int4")


def log(msg: str) -> None:
    print(f"[quant {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_out_perplexity(model_dir: Path, windows: list[list[int]], quantization: str, device: str,
                        dtype: str) -> float:
    from gpt2serve import LLM, EngineConfig, SamplingParams

    llm = LLM(EngineConfig(model=str(model_dir), device=device, dtype=dtype, quantization=quantization,
                           enable_prefix_caching=False, max_num_seqs=16, enforce_eager=True))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate(prompt_token_ids=windows, sampling_params=params)
    nll = [-lp.logprob for o in outs for lp in o.prompt_logprobs[1:]]
    del llm
    _free()
    return math.exp(sum(nll) / len(nll))


def quality(args, device: str) -> dict[str, Any]:
    """Train the small model, then held-out perplexity per mode."""
    from gpt2serve.benchmarks.train_spec_pair import encode_stream, stdlib_files, train
    from gpt2serve.engine.tiny_model import train_bpe_tokenizer
    from transformers import GPT2Config

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    train_texts, held_texts = stdlib_files()
    if args.small:
        train_texts, held_texts = train_texts[:40], held_texts[:8]
    tok, fast = train_bpe_tokenizer(train_texts, args.vocab_size)
    data = encode_stream(tok, train_texts)
    held = encode_stream(tok, held_texts)
    shape = dict(n_layer=2, n_embd=64, n_head=4) if args.small else dict(n_layer=12, n_embd=768, n_head=12)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=1024, **shape,
                        bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|endoftext|>"))
    target = work / "model"
    trained = train("model", config, data, args.train_seconds, batch=8 if args.small else 32,
                    seq=args.window, lr=1e-3 if args.small else 6e-4, device=torch.device(device), out=target,
                    tokenizer=fast)
    rng = random.Random(3)
    starts = [rng.randrange(len(held) - args.window) for _ in range(args.windows)]
    windows = [held[s:s + args.window].tolist() for s in starts]
    dtype = "float32" if device == "cpu" else "float16"
    ppl = {q: round(held_out_perplexity(target, windows, q, device, dtype), 4) for q in MODES}
    log(f"held-out perplexity: {ppl}")
    return {"trained": trained, "shape": shape, "windows": args.windows, "window_tokens": args.window,
            "held_out_tokens": len(held), "perplexity": ppl,
            "perplexity_change": {q: round(ppl[q] / ppl["none"] - 1, 5) for q in MODES}}


def last_logits(model: str, quantization: str, prompts: list[list[int]], device: str, dtype: str,
                load_format: str) -> torch.Tensor:
    """The logits the engine samples the first output token from, captured at the model's LM head."""
    from gpt2serve import LLM, EngineConfig, SamplingParams

    llm = LLM(EngineConfig(model=model, load_format=load_format, device=device, dtype=dtype,
                           quantization=quantization, enable_prefix_caching=False, enforce_eager=True,
                           max_num_seqs=len(prompts), num_gpu_blocks=len(prompts) * 16, max_model_len=256))
    model_ = llm.engine.runner.model
    captured: list[torch.Tensor] = []
    compute = model_.compute_logits
    model_.compute_logits = lambda hidden: captured.append(compute(hidden).float()) or captured[-1]
    llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=1, temperature=0,
                                                                          detokenize=False))
    logits = torch.cat(captured).cpu()
    del llm, model_, compute
    _free()
    return logits


def logit_error(args, device: str) -> dict[str, Any]:
    model = "gpt2" if args.small else "gpt2-xl"
    rng = random.Random(4)
    prompts = [[rng.randrange(50257) for _ in range(rng.randrange(16, 128))] for _ in range(16)]
    dtype = "float32" if device == "cpu" else "float16"
    ref = last_logits(model, "none", prompts, device, dtype, "dummy")
    out = {}
    for q in MODES[1:]:
        got = last_logits(model, q, prompts, device, dtype, "dummy")
        out[q] = {"relative_error": round(((got - ref).norm() / ref.norm()).item(), 5),
                  "argmax_agreement": round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)}
        log(f"{model} {q} logits vs none: {out[q]}")
    return {"model": model, "prompts": len(prompts), "modes": out}


def performance(args) -> list[dict[str, Any]]:
    from gpt2serve.benchmarks import offline

    records = []
    for q in MODES:
        argv = ["--workloads", args.workloads, "--model", "gpt2-xl", "--load-format", "dummy", "--dtype", "float16",
                "--device", "cuda", "--engine-arg", f"quantization={q}", "--commit", args.commit or git_commit()]
        for rec in offline.main(argv):
            rec["quantization"] = q
            records.append(rec)
        _free()
    return records


def markdown(quality_rec, logits_rec, perf) -> str:
    lines = []
    if quality_rec:
        p, c = quality_rec["perplexity"], quality_rec["perplexity_change"]
        lines += [f"Held-out perplexity of a {quality_rec['shape']} GPT-2 trained {quality_rec['trained']['train_seconds']:.0f} s "
                  f"on the standard library's source ({quality_rec['windows']} windows of {quality_rec['window_tokens']} tokens):", "",
                  "| weights | perplexity | vs fp16 |", "|---|---|---|"]
        lines += [f"| {q} | {p[q]:.3f} | {c[q]:+.2%} |" for q in MODES]
    if logits_rec:
        lines += ["", f"{logits_rec['model']} dummy weights, last-position logits of {logits_rec['prompts']} prompts:", "",
                  "| weights | relative error | argmax agreement |", "|---|---|---|"]
        lines += [f"| {q} | {v['relative_error']:.4f} | {v['argmax_agreement']:.0%} |" for q, v in logits_rec["modes"].items()]
    if perf:
        lines += ["", "| weights | workload | weight GiB | KV tokens | out tok/s | TPOT p50 ms | errors |",
                  "|---|---|---|---|---|---|---|"]
        for r in perf:
            lines.append(f"| {r['quantization']} | {r['workload']} | {r.get('weight_gib')} | {r.get('kv_tokens')} | "
                         f"{r.get('out_tok_s')} | {r.get('tpot_ms_p50')} | {r.get('error') or r.get('errors')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/quant-quality"))
    p.add_argument("--train-seconds", type=float, default=150)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--workloads", default="W1,W3")
    p.add_argument("--parts", default="quality,logits,performance")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny model, seconds of training, no W1/W3")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.small:
        args.train_seconds, args.vocab_size, args.window, args.windows = 3, 512, 64, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {
        "benchmark": "quantization", "device": device_name(torch.device(device)), "commit": args.commit or git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    result["quality"] = quality(args, device) if "quality" in parts else None
    result["logits"] = logit_error(args, device) if "logits" in parts else None
    result["performance"] = performance(args) if "performance" in parts and device == "cuda" else []
    write_results([result], args.out, lambda _: markdown(result["quality"], result["logits"], result["performance"]))
    return result


if __name__ == "__main__":
    main()
