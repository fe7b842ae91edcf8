"""Multi-LoRA serving cost on the GPU (issue 10): W1 spread over 4 adapters and W3 with an adapter, against no LoRA.

    python -m gpt2serve.benchmarks.lora_e2e_gpu --out benchmarks/results/<date>_lora_H100.json

GPT-2 XL, fp16 dummy weights; 4 rank-16 adapters in the PEFT layout with random A and B, written to a temporary
directory and loaded through the engine's real path (``lora_modules``). Two targetings are measured: PEFT's
default for GPT-2 (``c_attn`` only) and every linear layer (``c_attn``, ``c_proj``, ``c_fc``). Engines:
``base`` (LoRA off), and for each targeting ``lora`` (``enable_lora``, ``max_loras`` 4): W1 with request i using
adapter i mod 4, W3 (batch 1) with one adapter, and W3 on the LoRA engine with no adapter named (its steps replay
the graphs without LoRA). Timing as ``benchmarks/offline.py``; W3 cases of one engine run in alternation,
``--w3-repeats`` rounds, each reporting its median round (``tpot_ms_p50_rounds`` lists them all); W3 rows also give ``decode_graph_ms``, the GPU time
of the batch-1 decode graph the case replays (plain, or LoRA with its row on a slot) timed alone, without the
host's share of a step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gpt2serve.benchmarks.offline import (_params, build_workload, device_name, git_commit, latency_figures, log, sync,
                                          throughput_figures, warm_up_engine, write_results)

TARGETS = {"c_attn": ("attn.c_attn",), "all": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def write_adapter(path: Path, rank: int, modules: tuple[str, ...], n_layer: int, hidden: int, seed: int) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden), "mlp.c_fc": (hidden, 4 * hidden),
              "mlp.c_proj": (4 * hidden, hidden)}
    tensors = {}
    for layer in range(n_layer):
        for m in modules:
            k, n = shapes[m]
            key = f"base_model.model.transformer.h.{layer}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, k, generator=gen) * k ** -0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n, rank, generator=gen) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted({m.split(".")[1] for m in modules}),
         "fan_in_fan_out": True, "bias": "none"}))
    return path


def run_w1(llm, wl, loras) -> dict[str, Any]:
    params = [_params(n) for n in wl.out_lens]
    device = llm.engine.runner.device
    sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=wl.prompts, sampling_params=params, lora_name=loras)
    sync(device)
    rec = throughput_figures(wl, time.perf_counter() - t0)
    rec["errors"] = sum(len(o.outputs[0].token_ids) != n for o, n in zip(outs, wl.out_lens))
    return rec


def run_w3(llm, wl, lora) -> dict[str, Any]:
    ttft, tpot = [], []
    for prompt, n_out in zip(wl.prompts[:wl.runs], wl.out_lens[:wl.runs]):
        (out,) = llm.generate(prompt_token_ids=[prompt], sampling_params=_params(n_out), lora_name=lora)
        m = out.metrics
        ttft.append(m["first_token_time"] - m["arrival_time"])
        tpot.append((m["finished_time"] - m["first_token_time"]) / (n_out - 1))
    one = dataclasses.replace(wl, prompts=wl.prompts[:1], out_lens=wl.out_lens[:1])
    rec = throughput_figures(one, statistics.median(tpot) * (wl.out_lens[0] - 1) + statistics.median(ttft))
    rec.update(latency_figures(ttft, tpot, with_p99=False))
    return rec


def decode_graph_ms(llm, lora_slot: int | None, replays: int = 200) -> float | None:
    """GPU time of one batch-1 decode step alone: the plain graph, or the LoRA graph with its row on
    ``lora_slot``, replayed ``replays`` times between CUDA events (TPOT adds the host's share of a step)."""
    graphs = llm.engine.runner.graphs
    if graphs is None:
        return None
    graph = (graphs.graphs if lora_slot is None else graphs.lora_graphs).get(1)
    if graph is None:
        return None
    graphs.slot_mapping[:1].fill_(-1)  # store no K/V over a cached block
    if lora_slot is not None:
        graphs.lora_slots[:1].fill_(lora_slot)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / replays, 4)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-xl")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--targets", default="c_attn,all")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--w3-repeats", type=int, default=3, help="rounds of W3 per case (median reported)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from gpt2serve import LLM, EngineConfig
    from gpt2serve.engine.loader import load_hf_config

    base_cfg = dict(model=args.model, load_format="dummy", device=args.device,
                    dtype="float16" if args.device == "cuda" else "float32")
    hf = load_hf_config(EngineConfig(**base_cfg))
    w1 = build_workload("W1", args.scale, hf.vocab_size, hf.n_positions)
    w3 = build_workload("W3", args.scale, hf.vocab_size, hf.n_positions)
    common = {"model": args.model, "device": device_name(torch.device(args.device)), "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rank": args.rank, "num_adapters": args.num_adapters}
    records: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))

    def measure(engine: str, targets: str | None, config: dict[str, Any]) -> None:
        log(f"building {engine} ({targets})")
        llm = LLM(EngineConfig(**base_cfg, **config))
        warm_up_engine(llm)
        names = sorted(llm.engine.lora_names)
        cases = [("W1", None), ("W3", None)] if not names else \
            [("W1", [names[i % len(names)] for i in range(len(w1.prompts))]), ("W3", names[0]), ("W3", None)]
        # W3's cases alternate, args.w3_repeats rounds: a step's host share drifts by a few tenths of a ms over a
        # run, and each case should see the same drift; each case reports the median round.
        w3_runs: dict[Any, list[dict[str, Any]]] = {}
        for _ in range(args.w3_repeats):
            for workload, lora in cases:
                if workload == "W3":
                    w3_runs.setdefault(lora, []).append(run_w3(llm, w3, lora))
        for workload, lora in cases:
            rec = {**common, "engine": engine, "targets": targets, "workload": workload,
                   "adapters_used": (len(set(lora)) if isinstance(lora, list) else int(lora is not None))}
            if workload == "W1":
                rec.update(run_w1(llm, w1, lora))
            else:
                rounds = sorted(w3_runs[lora], key=lambda r: r["tpot_ms_p50"])
                rec.update(rounds[len(rounds) // 2])
                rec["tpot_ms_p50_rounds"] = [r["tpot_ms_p50"] for r in w3_runs[lora]]
            if workload == "W3" and args.device == "cuda":
                rec["decode_graph_ms"] = decode_graph_ms(llm, 0 if lora else None)
            log(f"{engine} {targets} {workload} adapters {rec['adapters_used']}: out tok/s {rec['out_tok_s']}, "
                f"TPOT p50 {rec.get('tpot_ms_p50')} ms, decode graph {rec.get('decode_graph_ms')} ms")
            records.append(rec)
            write_results(records, args.out, markdown)
        del llm
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    measure("base", None, {})
    for targets in args.targets.split(","):
        modules = [{"name": f"{targets}-{i}", "path": str(write_adapter(
            tmp / f"{targets}-{i}", args.rank, TARGETS[targets], hf.n_layer, hf.n_embd, seed=i))}
            for i in range(args.num_adapters)]
        measure("lora", targets, dict(enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank,
                                      lora_modules=modules))
    return records


def markdown(records: list[dict[str, Any]]) -> str:
    base = {r["workload"]: r for r in records if r["engine"] == "base"}
    lines = ["| engine | targets | workload | adapters used | out tok/s | TPOT p50 ms | vs base | decode graph ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        b = base.get(r["workload"])
        if r["workload"] == "W1":
            ratio = f"{r['out_tok_s'] / b['out_tok_s']:.2f} of base tok/s" if b else ""
        else:
            ratio = f"x{r['tpot_ms_p50'] / b['tpot_ms_p50']:.2f} TPOT" if b else ""
            g, bg = r.get("decode_graph_ms"), b.get("decode_graph_ms") if b else None
            if g is not None and bg:
                ratio += f" (graph x{g / bg:.2f})"
        lines.append(f"| {r['engine']} | {r['targets'] or '-'} | {r['workload']} | {r['adapters_used']} | "
                     f"{r['out_tok_s']} | {r.get('tpot_ms_p50')} | {ratio} | {r.get('decode_graph_ms', '-')} |")
    # The same engine with and without an adapter named: no difference in build, only the LoRA kernels.
    same = [(r, o) for r in records for o in records if r["engine"] == o["engine"] == "lora" and
            r["targets"] == o["targets"] and r["workload"] == o["workload"] == "W3" and r["adapters_used"] == 1 and
            o["adapters_used"] == 0]
    for r, o in same:
        lines.append(f"\nW3 {r['targets']}: with an adapter x{r['tpot_ms_p50'] / o['tpot_ms_p50']:.2f} the TPOT of the "
                     f"same engine without one (rounds {r.get('tpot_ms_p50_rounds')} against "
                     f"{o.get('tpot_ms_p50_rounds')} ms)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
