"""A real acceptance rate for speculative decoding: train a small target and a smaller draft, then measure.

    python -m gpt2serve.benchmarks.train_spec_pair --out benchmarks/results/<date>_spec-trained-pair_H100.json

Random weights make acceptance meaningless, and nothing can be downloaded on the GPU hosts, so this trains a pair
on text that is on every machine: the Python standard library's source. A byte-level BPE tokenizer (``tokenizers``)
is trained on it, then a target (GPT-2 small's shape, 12 x 768) and a draft (2 x 256) with the same tokenizer, each
for a fixed wall-clock budget (bf16 autocast, AdamW, cosine schedule), on the same stream of 512-token windows; a
held-out tenth of the files is never trained on. Both are saved as ordinary checkpoints (config + safetensors +
tokenizer) and loaded by the engine through the real path. Then, on held-out prompts (128 tokens, 128 greedy output
tokens), at batch 1 and 8: TPOT per output token and output tok/s without speculation, with the draft model and
with n-gram lookup (k = 4), with the acceptance rate from the engine's counters.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gpt2serve.engine.tiny_model import stdlib_sources, train_bpe_tokenizer


def log(msg: str) -> None:
    print(f"[pair {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stdlib_files(seed: int = 0) -> tuple[list[str], list[str]]:
    """The standard library's .py sources, shuffled, split 90 / 10 into train and held-out files."""
    texts = stdlib_sources(min_chars=2001)
    random.Random(seed).shuffle(texts)
    cut = len(texts) // 10
    return texts[cut:], texts[:cut]


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def train(name: str, config, data: torch.Tensor, seconds: float, batch: int, seq: int, lr: float,
          device: torch.device, out: Path, tokenizer) -> dict[str, Any]:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(1)
    start, step, losses = time.perf_counter(), 0, []
    warmup = 100
    while True:
        elapsed = time.perf_counter() - start
        if elapsed > seconds:
            break
        progress = min(elapsed / seconds, 1.0)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq] for s in starts.tolist()]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            losses.append(round(loss.item(), 4))
        step += 1
    tokens = step * batch * seq
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {params / 1e6:.1f} M parameters, {step} steps, {tokens / 1e6:.1f} M tokens in {seconds:.0f} s, "
        f"loss {losses[0]} -> {losses[-1]}")
    del model, opt
    gc.collect()
    return {"parameters": params, "steps": step, "train_tokens": tokens, "train_seconds": seconds,
            "loss_first": losses[0], "loss_last": losses[-1]}


def held_out_loss(model_dir: Path, data: torch.Tensor, device: torch.device, seq: int, windows: int = 64) -> float:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).to(device).eval()
    gen = torch.Generator().manual_seed(2)
    starts = torch.randint(0, len(data) - seq - 1, (windows,), generator=gen).tolist()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        x = torch.stack([data[s:s + seq] for s in starts]).to(device)
        loss = model(input_ids=x, labels=x).loss.item()
    del model
    return round(loss, 4)


def measure(target: Path, draft: Path, mode: str, prompts: list[list[int]], out_len: int, batch: int, k: int,
            device: str) -> dict[str, Any]:
    from gpt2serve import LLM, EngineConfig, SamplingParams

    spec = None
    if mode == "draft":
        spec = {"method": "draft_model", "num_speculative_tokens": k, "draft_model": str(draft),
                "draft_kv_cache_gib": 1.0, "min_acceptance_rate": 0.0}
    elif mode == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": k, "min_acceptance_rate": 0.0}
    llm = LLM(EngineConfig(model=str(target), device=device, dtype="float16" if device == "cuda" else "float32",
                           max_num_seqs=max(batch, 8), enable_prefix_caching=False, speculative=spec))
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True, detokenize=False)
    llm.generate(prompt_token_ids=prompts[:batch], sampling_params=params)  # warm-up (compiles, graphs)
    before = dict(llm.engine.stats())
    tpots, outputs, walls = [], [], []
    for i in range(0, len(prompts) - batch + 1, batch):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts[i:i + batch], sampling_params=params)
        if device == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        for o in outs:
            m = o.metrics
            tpots.append((m["finished_time"] - m["first_token_time"]) / (out_len - 1))
            outputs.append(o.outputs[0].token_ids)
    after = llm.engine.stats()
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in ("spec_num_draft_tokens", "spec_num_accepted_tokens",
                                                                   "spec_num_steps")}
    del llm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    rec = {"mode": mode, "batch": batch, "k": k if spec else 0, "tpot_ms_p50": round(statistics.median(tpots) * 1000, 3),
           "out_tok_s": round(len(outputs) * out_len / sum(walls), 1), "requests": len(outputs), **delta}
    if delta["spec_num_draft_tokens"]:
        rec["acceptance"] = round(delta["spec_num_accepted_tokens"] / delta["spec_num_draft_tokens"], 4)
        rec["emitted_per_verify_step"] = round(1 + delta["spec_num_accepted_tokens"] / delta["spec_num_steps"], 3)
    rec["_outputs"] = outputs
    return rec


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/spec-pair"))
    p.add_argument("--target-seconds", type=float, default=150)
    p.add_argument("--draft-seconds", type=float, default=60)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny models, seconds of training")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from transformers import GPT2Config

    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    train_texts, held_texts = stdlib_files()
    if args.small:
        train_texts, held_texts = train_texts[:40], held_texts[:8]
        args.target_seconds, args.draft_seconds, args.vocab_size, args.prompts = 4, 2, 1024, 2
        args.batch_sizes = "1,2"
    args.workdir.mkdir(parents=True, exist_ok=True)
    tok, fast = train_bpe_tokenizer(train_texts, args.vocab_size)
    train_data, held_data = encode_stream(tok, train_texts), encode_stream(tok, held_texts)
    log(f"corpus: {len(train_texts)} train files ({len(train_data) / 1e6:.1f} M tokens), {len(held_texts)} held-out "
        f"({len(held_data) / 1e6:.2f} M tokens), vocab {tok.get_vocab_size()}")
    eos = tok.token_to_id("<|endoftext|>")
    common = dict(vocab_size=tok.get_vocab_size(), n_positions=512, bos_token_id=eos, eos_token_id=eos)
    shapes = {"target": dict(n_layer=12, n_embd=768, n_head=12), "draft": dict(n_layer=2, n_embd=256, n_head=4)}
    if args.small:
        shapes = {"target": dict(n_layer=2, n_embd=64, n_head=4), "draft": dict(n_layer=1, n_embd=32, n_head=2)}
    dirs = {name: args.workdir / name for name in shapes}
    info = {}
    for name, seconds, lr in (("target", args.target_seconds, 6e-4), ("draft", args.draft_seconds, 1e-3)):
        info[name] = train(name, GPT2Config(**common, **shapes[name]), train_data, seconds, 32, 512, lr, device,
                           dirs[name], fast)
        info[name]["held_out_loss"] = held_out_loss(dirs[name], held_data, device, 512)
        info[name].update(shapes[name])

    rng = random.Random(3)
    prompts = []
    while len(prompts) < args.prompts:
        s = rng.randrange(0, len(held_data) - 200)
        prompts.append(held_data[s:s + 128].tolist())
    records, reference = [], {}
    common_rec = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "target": info["target"], "draft": info["draft"], "prompt_len": 128, "output_len": 128}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for mode in ("no-spec", "draft", "ngram"):
            rec = measure(dirs["target"], dirs["draft"], mode, prompts, 128, batch, args.k, device.type)
            outputs = rec.pop("_outputs")
            if mode == "no-spec":
                reference[batch] = outputs
            else:
                rec["outputs_equal_no_spec"] = sum(a == b for a, b in zip(outputs, reference[batch]))
                base = next(r for r in records if r["mode"] == "no-spec" and r["batch"] == batch)
                rec["speedup_tpot"] = round(base["tpot_ms_p50"] / rec["tpot_ms_p50"], 3)
            records.append({**common_rec, **rec})
            log(f"batch {batch} {mode}: {json.dumps({k: v for k, v in rec.items() if k != 'target'})}")
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(records, indent=1) + "\n")
    lines = [f"Trained pair on the Python standard library ({common_rec['device']}): target 12x768 "
             f"({info['target']['parameters'] / 1e6:.0f} M, held-out loss {info['target']['held_out_loss']}), draft "
             f"2x256 ({info['draft']['parameters'] / 1e6:.1f} M, held-out loss {info['draft']['held_out_loss']}), "
             "k = 4, greedy, 128-token held-out prompts, 128 output tokens", "",
             "| batch | proposer | TPOT p50 ms | speed-up | out tok/s | acceptance | tokens / verify step | same output as no-spec |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['batch']} | {r['mode']} | {r['tpot_ms_p50']} | {r.get('speedup_tpot', '—')} | {r['out_tok_s']} "
                     f"| {r.get('acceptance', '—')} | {r.get('emitted_per_verify_step', '—')} "
                     f"| {r.get('outputs_equal_no_spec', '—')} / {r['requests']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.with_suffix(".md").write_text(table)
    return records


if __name__ == "__main__":
    main()
