"""Offline benchmarks W1-W3 and W5 of benchmarks/README.md: our engine and the HuggingFace baselines, one process.

    python -m gpt2serve.benchmarks.offline --workloads W1,W2,W3 --model gpt2-xl --load-format dummy --dtype float16 \\
        --baselines hf-generate,hf-generate_batch,hf-generate-static --out benchmarks/results/<file>.json

Order of work: build our engine, warm it up, time every workload on it, free it (its KV pool takes most of the
GPU), then build one HF ``GPT2LMHeadModel`` of the same config and time the baselines, the slow ones on a
fraction of the requests when ``--baseline-scale`` says so. Every record is written to the JSON (and the markdown
table beside it) as soon as it exists, so a job killed at its time limit still leaves what it measured.

Timing rules: CUDA is synchronized before each clock read; warm-up passes (ours, HF's, transformers' own
compile / CUDA-graph capture) are outside the timed region; every request must produce exactly its output
length (EOS ignored), and the harness checks that and counts violations in ``errors``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import json
import math
import random
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

# ----------------------------------------------------------------------------------------------- workloads
WORKLOADS = ("W1", "W2", "W3", "W5")
BASELINES = ("hf-generate", "hf-generate_batch", "hf-generate-static")
# Which baseline runs on which workload (benchmarks/README.md).
BASELINES_FOR = {"W1": ("hf-generate", "hf-generate_batch"), "W2": ("hf-generate", "hf-generate_batch"),
                 "W3": ("hf-generate", "hf-generate-static"), "W5": ("hf-generate",)}
TOKEN_ID_RANGE = 50_000  # prompts draw ids 0..50000 (inclusive), modulo the vocabulary of smaller models
W3_RUNS = 5
PAD_ID = 0  # left padding of HF's static batches; masked out, so any id does

# Physical ceilings on one H100 80GB for GPT-2 XL in fp16 (benchmarks/README.md): out tok/s for W1/W2, TPOT floor
# for W3.
H100_CEILINGS = {"W1": 24_000.0, "W2": 17_600.0, "W3_tpot_ms": 1.04}
# W5: with the shared prefix read once per step for all sequences, ~60,000 out tok/s; an engine whose attention reads
# each sequence's whole context (no prefix caching, or caching without shared-prefix attention) is capped at ~14,800.
W5_CEILINGS = {True: 60_000.0, False: 14_800.0}
# vLLM 0.26.0 on an H100 (benchmarks/README.md), the peer: not runnable in our jobs, quoted beside our figures.
VLLM_H100 = {"W1": 14_050.0, "W2": 8_523.0, "W3_tpot_ms": 2.96, "W5": 13_084.0, "W5-no-prefix-caching": 7_675.0}
GPT2_XL_GEOMETRY = dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257)

# Rough HF baseline costs on an H100 with GPT-2 XL fp16, from benchmarks/README.md's figures, used only to predict
# whether a baseline still fits in --deadline-s. hf-generate at batch 128: 1,036 out tok/s over 4 x 256 steps
# is ~0.124 s a decode step (0.15 allowed for W2's longer padded contexts); generate_batch: 925 out tok/s;
# batch-1 TPOT 105.7 ms dynamic, 11.2 ms static; the static cache's first call compiles (about a minute, a guess).
HF_STEP_S = 0.15
HF_CB_TOK_S = 925.0
HF_W3_TPOT_S = {"hf-generate": 0.1057, "hf-generate-static": 0.0112}
HF_FIXED_S = {"hf-generate": 5.0, "hf-generate_batch": 20.0, "hf-generate-static": 90.0}


@dataclass
class Workload:
    """Requests of one workload. For W3 each prompt is one timed run of a single request."""

    name: str
    prompts: list[list[int]]
    out_lens: list[int]
    runs: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def num_requests(self) -> int:
        return 1 if self.name == "W3" else len(self.prompts)

    def head(self, k: int) -> "Workload":
        """The first k requests (W1/W2) or runs (W3): W2's lengths are i.i.d. draws, so a head keeps their law."""
        k = max(1, min(k, len(self.prompts)))
        return dataclasses.replace(self, prompts=self.prompts[:k], out_lens=self.out_lens[:k],
                                   runs=min(self.runs, k), notes=list(self.notes))


def _scaled(n: int, scale: float, minimum: int) -> int:
    return max(minimum, int(round(n * scale)))


def build_workload(name: str, scale: float, vocab_size: int, max_model_len: int, variant: int = 0) -> Workload:
    """Request lengths of benchmarks/README.md, shrunk by ``scale`` and clamped to ``max_model_len``.

    Lengths are drawn at full scale and then scaled, so a scaled W2 keeps the shape of its length distribution.
    Outputs keep at least 2 tokens so that TPOT (which divides by n_out - 1) stays defined.
    """
    if name == "W1":
        n, lengths = 512, [(256, 256)] * 512
        token_rng = random.Random(1)
    elif name == "W2":
        rng = random.Random(0)  # exactly as benchmarks/README.md: (prompt, output) per request, in that order
        lengths = [(rng.randint(16, 768), rng.randint(16, 256)) for _ in range(1000)]
        n = 1000
        token_rng = random.Random(2)  # token ids from their own stream so the lengths stay the documented ones
    elif name == "W5":
        # One 512-token prefix shared by all, then 64 tokens of each request's own; all arrive at t=0. The token
        # stream is per variant, so that the run with prefix caching finds nothing left from an earlier run.
        n, lengths = 512, [(576, 128)] * 512
        token_rng = random.Random(5 + variant)
    elif name == "W3":
        # One request per run; every run gets fresh random tokens so that a prefix cache cannot serve a repeat.
        n, lengths = W3_RUNS, [(128, 256)] * W3_RUNS
        token_rng = random.Random(3)
    else:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if name != "W3":
        n = _scaled(n, scale, 1)
        lengths = lengths[:n]
    clamped = 0
    prompts, outs = [], []
    for p, o in lengths:
        p, o = _scaled(p, scale, 1), _scaled(o, scale, 2)
        # Our engine and HF both need prompt + output <= max_model_len (the last sampled token is never fed back,
        # but keeping the sum inside the context is what both accept).
        o2 = min(o, max_model_len - 1)
        p2 = min(p, max_model_len - o2)
        clamped += (p2, o2) != (p, o)
        if name == "W5":
            if not prompts:
                shared = [token_rng.randint(0, TOKEN_ID_RANGE) % vocab_size for _ in range(_scaled(512, scale, 1))]
            own = max(p2 - len(shared), 1)
            prompts.append(shared[:p2 - own] + [token_rng.randint(0, TOKEN_ID_RANGE) % vocab_size
                                               for _ in range(own)])
            outs.append(o2)
            continue
        prompts.append([token_rng.randint(0, TOKEN_ID_RANGE) % vocab_size for _ in range(p2)])
        outs.append(o2)
    wl = Workload(name, prompts, outs, runs=W3_RUNS if name == "W3" else 1)
    if scale != 1.0:
        wl.notes.append(f"--scale {scale}: request count and lengths scaled from benchmarks/README.md")
    if clamped:
        wl.notes.append(f"{clamped} requests clamped to max_model_len {max_model_len}")
    if vocab_size <= TOKEN_ID_RANGE:
        wl.notes.append(f"token ids taken modulo vocab_size {vocab_size}")
    return wl


# ----------------------------------------------------------------------------------------------- helpers
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def git_commit() -> str:
    """HEAD of the checkout, with '-dirty' when tracked files differ; 'unknown' where there is no .git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def throughput_figures(wl: Workload, wall_s: float) -> dict[str, Any]:
    """out/total tok/s over the requested (useful) tokens; padding an engine generated on top does not count."""
    n_out = sum(wl.out_lens)
    n_in = sum(len(p) for p in wl.prompts)
    return {"wall_s": _round(wall_s), "out_tok_s": _round(n_out / wall_s, 1),
            "total_tok_s": _round((n_in + n_out) / wall_s, 1), "prompt_tokens": n_in, "output_tokens": n_out}


def latency_figures(ttft_s: list[float], tpot_s: list[float], with_p99: bool) -> dict[str, Any]:
    def ms(xs: list[float], q: float) -> float | None:
        return _round(None if not xs else percentile(xs, q) * 1000.0)

    return {"ttft_ms_p50": ms(ttft_s, 50), "tpot_ms_p50": ms(tpot_s, 50),
            "ttft_ms_mean": _round(statistics.fmean(ttft_s) * 1000.0) if ttft_s else None,
            "ttft_ms_p99": ms(ttft_s, 99) if with_p99 else None, "tpot_ms_p99": ms(tpot_s, 99) if with_p99 else None}


# ----------------------------------------------------------------------------------------------- our engine
def _params(max_tokens: int):
    from gpt2serve import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)


def warm_up_engine(llm) -> None:
    """One short mixed prefill + decode batch, so first-call costs (cuBLAS handles, kernel JIT, allocator growth)
    stay out of the timed runs. Fresh random prompts: nothing here can be prefix-cached into a workload."""
    rng = random.Random(12345)
    runner = llm.engine.runner
    room = min(llm.engine.max_model_len, runner.num_blocks * runner.block_size)  # one request must fit the pool
    n_in = max(1, min(64, room // 2))
    n_out = max(2, min(8, room - n_in))
    vocab_size = llm.engine.vocab_size
    prompts = [[rng.randrange(vocab_size) for _ in range(n_in)] for _ in range(16)]
    llm.generate(prompt_token_ids=prompts, sampling_params=_params(n_out))


def _check_lengths(outs, wl_outs: list[int]) -> int:
    """How many requests did not produce exactly their output length."""
    return sum(len(o.outputs[0].token_ids) != n for o, n in zip(outs, wl_outs, strict=True))


_GAUGES = {"num_running", "num_waiting", "num_swapped", "kv_usage", "num_free_blocks", "num_total_blocks",
           "num_cached_blocks"}


def _engine_counters(llm) -> dict[str, float]:
    """The scheduler's cumulative counters (preemptions, swaps, ...), without its point-in-time gauges."""
    stats = llm.engine.stats() if hasattr(llm.engine, "stats") else {}
    return {k: v for k, v in stats.items() if k not in _GAUGES and isinstance(v, (int, float))}


def _step_totals(llm) -> dict[str, float]:
    """Cumulative step time by phase (ms) and step count, from the engine's mean-per-step ``step_timing()``."""
    if not hasattr(llm.engine, "step_timing"):
        return {}
    timing = llm.engine.step_timing()
    steps = timing.get("steps", 0)
    return {"steps": steps, **{k: v * steps for k, v in timing.items() if k.endswith("_ms")}}


def run_ours(llm, wl: Workload, device: torch.device) -> dict[str, Any]:
    before, steps_before = _engine_counters(llm), _step_totals(llm)
    rec = _run_ours(llm, wl, device)
    after, steps_after = _engine_counters(llm), _step_totals(llm)
    # What the scheduler had to do during this workload: preemptions explain a throughput dip.
    rec["engine_counters"] = {k: v - before.get(k, 0) for k, v in after.items()}
    # Where a step's time went during this workload (CPU phases vs forward launch vs sampling, which waits for
    # the GPU): mean ms per step over this workload's steps only.
    steps = steps_after.get("steps", 0) - steps_before.get("steps", 0)
    if steps > 0:
        rec["step_timing_ms"] = {"steps": steps, **{k: _round((v - steps_before.get(k, 0.0)) / steps)
                                                     for k, v in steps_after.items() if k != "steps"}}
    return rec


def run_ours_caching(llm, wl: Workload, device: torch.device, caching: bool) -> dict[str, Any]:
    """``run_ours`` with the engine's prefix caching switched on or off for this workload (W5), and a trace of
    its steps, to show where the time goes: [sequences, new tokens, prefill tokens, step ms, schedule ms,
    execute ms, update ms] each (execute includes waiting for the GPU)."""
    engine, trace = llm.engine, []
    saved, engine.kv.enable_prefix_caching = engine.kv.enable_prefix_caching, caching
    last = dict(engine._timing)

    def planned(sched) -> None:
        counts = sched.num_scheduled_tokens.values()
        trace.append([len(counts), sum(counts), sum(n for n in counts if n > 1)])

    def done(seconds: float) -> None:
        now = engine._timing
        trace[-1] += [_round(seconds * 1000.0)] + [_round((now[k] - last[k]) * 1000.0) for k in
                                                   ("schedule_s", "execute_s", "update_s")]
        last.update(now)

    engine.schedule_observers.append(planned)
    engine.step_observers.append(done)
    try:
        rec = run_ours(llm, wl, device)
    finally:
        engine.kv.enable_prefix_caching = saved
        engine.schedule_observers.remove(planned)
        engine.step_observers.remove(done)
    rec["step_trace"] = trace
    return rec


def _run_ours(llm, wl: Workload, device: torch.device) -> dict[str, Any]:
    if wl.name == "W3":
        ttft, tpot, walls, bad = [], [], [], 0
        for prompt, n_out in zip(wl.prompts[:wl.runs], wl.out_lens[:wl.runs]):
            sync(device)
            t0 = time.perf_counter()
            (out,) = llm.generate(prompt_token_ids=[prompt], sampling_params=_params(n_out))
            sync(device)
            walls.append(time.perf_counter() - t0)
            bad += _check_lengths([out], [n_out])
            m = out.metrics
            ttft.append(m["first_token_time"] - m["arrival_time"])
            tpot.append((m["finished_time"] - m["first_token_time"]) / (n_out - 1))
        one = dataclasses.replace(wl, prompts=wl.prompts[:1], out_lens=wl.out_lens[:1])
        rec = throughput_figures(one, statistics.median(walls))
        rec.update(latency_figures(ttft, tpot, with_p99=False))
        rec.update(runs=wl.runs, errors=bad, ttft_ms_runs=[_round(t * 1000) for t in ttft],
                   tpot_ms_runs=[_round(t * 1000) for t in tpot])
        rec["notes"] = ["W3: median of runs; wall/out_tok_s are the median run's; TTFT and TPOT from the engine's "
                        "per-request metrics (arrival, first token, finish)"]
        return rec

    params = [_params(n) for n in wl.out_lens]
    sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=wl.prompts, sampling_params=params)
    sync(device)
    wall = time.perf_counter() - t0
    rec = throughput_figures(wl, wall)
    ttft = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
    tpot = [(o.metrics["finished_time"] - o.metrics["first_token_time"]) / (n - 1)
            for o, n in zip(outs, wl.out_lens) if n > 1]
    # All requests arrive at t=0, so TTFT here is mostly queueing: informative, not comparable to W3 or W4.
    rec.update(latency_figures(ttft, tpot, with_p99=True))
    rec["errors"] = _check_lengths(outs, wl.out_lens)
    rec["generated_output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
    rec["notes"] = ["TTFT/TPOT percentiles over requests that all arrive at t=0 (queueing included)"]
    return rec


# ----------------------------------------------------------------------------------------------- HF baselines
def build_hf_model(engine_config, hf_config, device: torch.device, dtype: torch.dtype):
    """HF's GPT-2 of the same config: the checkpoint's weights when the engine loads real ones, else random
    (random weights cost exactly the same compute and memory traffic)."""
    from transformers import GPT2LMHeadModel

    from gpt2serve.engine.loader import model_dir

    directory = None if engine_config.load_format == "dummy" else model_dir(engine_config)
    if directory is not None and any(directory.glob("*.safetensors")):
        model = GPT2LMHeadModel.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").to(device)
        weights = f"checkpoint weights from {directory}"
    else:
        # Built directly on the device in the target dtype: no fp32 copy of GPT-2 XL on the host.
        with torch.device(device):
            model = GPT2LMHeadModel._from_config(copy.deepcopy(hf_config), dtype=dtype, attn_implementation="sdpa")
        weights = "random weights (HF init) of the same config"
    model.eval()
    # generate() fills unset GenerationConfig fields from model.generation_config, EOS included: clear it there
    # so that every request runs to its full length.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model, weights


def _gen_config(max_new_tokens: int, **extra):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID,
                            **extra)


def _left_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def static_batch_plan(wl: Workload, batch_size: int) -> list[list[int]]:
    """Request indices of each static batch: sorted by (output, prompt) length so that a batch wastes few decode
    steps on requests that already have all their tokens, then cut into batches of ``batch_size``."""
    order = sorted(range(len(wl.prompts)), key=lambda i: (wl.out_lens[i], len(wl.prompts[i])))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def sample_static_batches(wl: Workload, batch_size: int, fraction: float) -> tuple[Workload, str]:
    """A systematic sample of the batch plan: of n batches keep k = round(n * fraction), one from the middle of
    each of k equal strata. Throughput over the kept batches estimates the whole plan's, short and long batches
    alike (a head of the requests would instead run one unsorted batch, which pads far more). The kept requests
    come back in plan order, so planning them again yields exactly the kept batches (only the plan's last
    batch can be short, and it sorts last)."""
    plan = static_batch_plan(wl, batch_size)
    k = max(1, min(len(plan), int(round(len(plan) * fraction))))
    kept = [int((i + 0.5) * len(plan) / k) for i in range(k)]
    idx = [i for b in kept for i in plan[b]]
    sub = dataclasses.replace(wl, prompts=[wl.prompts[i] for i in idx], out_lens=[wl.out_lens[i] for i in idx],
                              notes=list(wl.notes))
    return sub, f"batches {[b + 1 for b in kept]} of the {len(plan)} sorted batches ({len(idx)} requests)"


def hf_static_batches(model, wl: Workload, device: torch.device, batch_size: int) -> dict[str, Any]:
    """HF ``generate`` with static batching (dynamic cache): batches of ``batch_size`` from
    ``static_batch_plan``, left padding + attention mask. A batch runs to its longest output, and only each
    request's own output length counts as produced."""
    batches = static_batch_plan(wl, batch_size)
    inputs = [_left_padded([wl.prompts[i] for i in b], device) for b in batches]
    # Warm-up: one small batch through prefill and decode (cuBLAS, SDPA kernels, allocator).
    with torch.no_grad():
        ids, mask = inputs[0]
        model.generate(input_ids=ids[:, -8:], attention_mask=mask[:, -8:], generation_config=_gen_config(4))
    sync(device)
    generated = useful = bad = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for b, (ids, mask) in zip(batches, inputs):
            new = max(wl.out_lens[i] for i in b)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_gen_config(new))
            got = out.shape[1] - ids.shape[1]
            generated += got * len(b)
            useful += sum(min(got, wl.out_lens[i]) for i in b)
            bad += sum(got < wl.out_lens[i] for i in b)
    sync(device)
    wall = time.perf_counter() - t0
    rec = throughput_figures(wl, wall)
    rec.update(errors=bad, generated_output_tokens=useful, padded_output_tokens=generated)
    equal = len({len(p) for p in wl.prompts}) == 1 and len(set(wl.out_lens)) == 1
    rec["notes"] = [f"static batches of {batch_size}: {len(batches)} batch(es)" + (
        ", equal lengths, no padding" if equal else
        ", sorted by (output, prompt) length, left padding + attention mask; each batch decodes to its longest "
        f"output, so {generated} tokens were generated for {sum(wl.out_lens)} requested (only these count)")]
    return rec


class _TokenClock:
    """A generate() streamer that only stamps the time of each put: the prompt first, then one per new token.
    generate() hands it tokens already copied to the host, so each stamp is after the device finished them."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_single_stream(model, wl: Workload, device: torch.device, static_cache: bool) -> dict[str, Any]:
    """W3 at batch 1: TTFT and TPOT per run from the streamer's stamps, median over runs."""
    extra = {"cache_implementation": "static"} if static_cache else {}
    n_out = wl.out_lens[0]
    with torch.no_grad():
        # Warm-up. With a static cache transformers compiles the decode step (on CUDA) for these exact shapes, so
        # the warm-up is one full run of the same lengths; the dynamic cache needs only a short one.
        ids = torch.tensor([wl.prompts[0]], device=device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                       generation_config=_gen_config(n_out if static_cache else 8, **extra))
    sync(device)
    ttft, tpot, walls, bad = [], [], [], 0
    for prompt in wl.prompts[:wl.runs]:
        ids = torch.tensor([prompt], device=device)
        mask = torch.ones_like(ids)
        clock = _TokenClock()
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_gen_config(n_out, **extra),
                                 streamer=clock)
        sync(device)
        walls.append(time.perf_counter() - t0)
        stamps = clock.times[1:]  # the first put is the prompt
        bad += int(out.shape[1] - ids.shape[1] != n_out or len(stamps) != n_out)
        ttft.append(stamps[0] - t0)
        tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    one = dataclasses.replace(wl, prompts=wl.prompts[:1], out_lens=wl.out_lens[:1])
    rec = throughput_figures(one, statistics.median(walls))
    rec.update(latency_figures(ttft, tpot, with_p99=False))
    rec.update(runs=wl.runs, errors=bad, ttft_ms_runs=[_round(t * 1000) for t in ttft],
               tpot_ms_runs=[_round(t * 1000) for t in tpot])
    # transformers keeps its torch.compile'd __call__ on the model once it decided to compile.
    compiled = getattr(model, "_compiled_call", None) is not None
    rec["compiled_decode"] = compiled
    rec["notes"] = [("static cache, batch 1, " + ("decode step compiled by transformers" if compiled else
                                                  "decode step NOT compiled (transformers compiles on CUDA only)"))
                    if static_cache else "dynamic cache, batch 1",
                    "TTFT/TPOT from a streamer's host stamps (each after the token reached the host)"]
    return rec


def _cb_config(device: torch.device, num_requests: int):
    """HF's defaults, except that it must not swap sdpa for a flash kernel (5.2x auto-switches when one is
    importable; older versions have no such switch and keep paged|sdpa). On the CPU HF would size its KV cache
    from the host's free memory, seconds of allocation for a smoke test, so it gets a small fixed pool there."""
    from transformers import ContinuousBatchingConfig

    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    kwargs: dict[str, Any] = {"auto_switch_to_flash": False} if "auto_switch_to_flash" in names else {}
    if device.type == "cpu":
        kwargs.update(num_blocks=max(64, 3 * num_requests), max_batch_tokens=512)
    return ContinuousBatchingConfig(**kwargs), kwargs


def hf_continuous_batching(model, wl: Workload, device: torch.device) -> dict[str, Any]:
    """HF continuous batching (``attn_implementation="paged|sdpa"``), under torch.no_grad(), not inference_mode().

    Equal output lengths (W1) go through ``model.generate_batch``. It takes one max_new_tokens for all, so W2's
    per-request lengths go through the manager that generate_batch wraps (``continuous_batching_context_manager``
    + ``add_request(max_new_tokens=...)``), the same loop. Either way the manager's own warm-up (CUDA-graph capture)
    runs before the first request is added; the timed span runs from the first request's creation to the last
    one's end, from the timestamps transformers keeps on each result. The whole call's wall is kept beside it.
    """
    import transformers
    from transformers.generation.continuous_batching.utils import WorkloadHints

    previous = model.config._attn_implementation
    model.set_attn_implementation("paged|sdpa")
    in_use = model.config._attn_implementation  # 5.2x strips the paged| prefix: plain sdpa is paged-aware there
    gen_cfg = _gen_config(max(wl.out_lens))
    gen_cfg.eos_token_id = -1  # CB falls back to the model config's EOS when this is None; -1 never matches
    api = "generate_batch" if len(set(wl.out_lens)) == 1 else "continuous_batching_context_manager"
    cb_config, cb_overrides = _cb_config(device, len(wl.prompts))
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            if api == "generate_batch":
                results = list(model.generate_batch(inputs=wl.prompts, generation_config=gen_cfg,
                                                    continuous_batching_config=cb_config,
                                                    max_new_tokens=wl.out_lens[0]).values())
            else:
                hints = WorkloadHints(max_prompt_length=max(len(p) for p in wl.prompts),
                                      max_generated_length=max(wl.out_lens), num_requests=len(wl.prompts))
                with model.continuous_batching_context_manager(
                        generation_config=gen_cfg, continuous_batching_config=cb_config, block=True, timeout=5,
                        workload_hints=hints) as manager:
                    ids = [manager.add_request(input_ids=p, max_new_tokens=n) for p, n in zip(wl.prompts, wl.out_lens)]
                    done: dict[str, Any] = {}
                    while len(done) < len(ids):
                        res = manager.get_result(timeout=1)
                        if res is not None and res.is_finished():
                            done[res.request_id] = res
                        elif res is None and not manager.is_running():
                            raise RuntimeError("HF continuous batching thread died")
                results = [done[i] for i in ids]
        sync(device)
        call_wall = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(previous)
    if len(results) != len(wl.prompts):
        raise RuntimeError(f"{len(wl.prompts)} requests but {len(results)} results")
    span = max(r.lifespan[1] for r in results) - min(r.created_time for r in results)
    rec = throughput_figures(wl, span)
    rec["errors"] = sum(r.error is not None or len(r.generated_tokens) != n for r, n in zip(results, wl.out_lens))
    rec["generated_output_tokens"] = sum(len(r.generated_tokens) for r in results)
    rec["call_wall_s"] = _round(call_wall)
    rec["notes"] = [f"transformers {transformers.__version__} {api}, attn_implementation paged|sdpa "
                    f"(config reads {in_use!r}), ContinuousBatchingConfig defaults except {cb_overrides}",
                    "wall_s = first request created -> last finished (manager warm-up / graph capture excluded); "
                    "call_wall_s includes them"]
    return rec


def run_baseline(engine: str, model, wl: Workload, device: torch.device, batch_size: int) -> dict[str, Any]:
    if engine == "hf-generate_batch":
        return hf_continuous_batching(model, wl, device)
    if wl.name == "W3":
        return hf_single_stream(model, wl, device, static_cache=engine == "hf-generate-static")
    return hf_static_batches(model, wl, device, batch_size)


# ----------------------------------------------------------------------------------------------- orchestration
class Skipped(Exception):
    """A measurement left out on purpose (time budget); recorded as an error without a traceback."""


def _skip(msg: str) -> dict[str, Any]:
    raise Skipped(msg)


def _fail(msg: str) -> dict[str, Any]:
    raise RuntimeError(msg)


def parse_baseline_scales(specs: list[str]) -> Callable[[str, str], float]:
    """``--baseline-scale`` specs: ``0.25`` (all), ``W2=0.25``, ``hf-generate=0.25``, ``hf-generate:W2=0.25``.
    The most specific match wins."""
    table: dict[tuple[str | None, str | None], float] = {}
    for spec in specs:
        key, _, value = spec.rpartition("=")
        engine = workload = None
        for part in filter(None, key.split(":")):
            if part in WORKLOADS:
                workload = part
            elif part in BASELINES:
                engine = part
            else:
                raise ValueError(f"--baseline-scale {spec!r}: {part!r} is neither a workload nor a baseline")
        scale = float(value)
        if not 0 < scale <= 1:
            raise ValueError(f"--baseline-scale {spec!r}: the fraction must be in (0, 1]")
        table[(engine, workload)] = scale

    def lookup(engine: str, workload: str) -> float:
        for key in ((engine, workload), (engine, None), (None, workload), (None, None)):
            if key in table:
                return table[key]
        return 1.0

    return lookup


def _parse_value(text: str) -> Any:
    import yaml  # the engine's config already depends on it

    return yaml.safe_load(text)


def expected_seconds(engine: str, wl: Workload, h100_xl: bool, batch_size: int) -> float:
    """A rough duration from the HF baselines' H100 figures, for --deadline-s; 0 when they do not apply."""
    if not h100_xl:
        return 0.0
    if wl.name == "W3":  # the static cache's warm-up is one more full run, the dynamic cache's a short one
        runs = wl.runs + (1 if engine == "hf-generate-static" else 0)
        return HF_FIXED_S[engine] + runs * wl.out_lens[0] * HF_W3_TPOT_S[engine]
    if engine == "hf-generate":
        steps = sum(max(wl.out_lens[i] for i in b) for b in static_batch_plan(wl, batch_size))
        return HF_FIXED_S[engine] + steps * HF_STEP_S
    return HF_FIXED_S[engine] + sum(wl.out_lens) / HF_CB_TOK_S


def is_gpt2_xl(hf_config) -> bool:
    return all(getattr(hf_config, k, None) == v for k, v in GPT2_XL_GEOMETRY.items())


def ceiling_fraction(rec: dict[str, Any], h100_xl_fp16: bool) -> float | None:
    """Fraction of the H100 ceiling in benchmarks/README.md; only for GPT-2 XL fp16 on an H100 and the unscaled workload
    (the ceilings are computed for exactly those requests)."""
    if not h100_xl_fp16 or rec.get("error") or rec.get("scale") != 1.0 or rec.get("baseline_scale") not in (None, 1.0):
        return None
    if rec["workload"] in ("W1", "W2") and rec.get("out_tok_s"):
        return _round(rec["out_tok_s"] / H100_CEILINGS[rec["workload"]], 4)
    if rec["workload"] == "W3" and rec.get("tpot_ms_p50"):
        return _round(H100_CEILINGS["W3_tpot_ms"] / rec["tpot_ms_p50"], 4)
    if rec["workload"] == "W5" and rec.get("out_tok_s") and "prefix_caching" in rec:
        return _round(rec["out_tok_s"] / W5_CEILINGS[rec["prefix_caching"]], 4)
    return None


def ratio_to_vllm(rec: dict[str, Any]) -> float | None:
    """Ours over vLLM's figure in benchmarks/README.md for the same workload (>1: ours is better); H100 GPT-2 XL
    fp16 only."""
    key = rec["workload"] + ("-no-prefix-caching" if rec.get("prefix_caching") is False else "")
    if key == "W3":
        return _round(VLLM_H100["W3_tpot_ms"] / rec["tpot_ms_p50"], 3) if rec.get("tpot_ms_p50") else None
    return _round(rec["out_tok_s"] / VLLM_H100[key], 3) if key in VLLM_H100 and rec.get("out_tok_s") else None


def add_ratios(records: list[dict[str, Any]]) -> None:
    """ratio_to_<baseline> on our records: how many times better ours is than a baseline of the same job
    (throughput ratio for W1/W2; baseline TPOT / our TPOT for W3, with ttft_ratio_to_<baseline> beside it)."""
    for ours in records:
        if not ours["engine"].startswith("ours") or ours.get("error"):
            continue
        for base in records:
            if base["workload"] != ours["workload"] or base["engine"].startswith("ours") or base.get("error"):
                continue
            if ours["workload"] == "W3":
                if base.get("tpot_ms_p50") and ours.get("tpot_ms_p50"):
                    ours[f"ratio_to_{base['engine']}"] = _round(base["tpot_ms_p50"] / ours["tpot_ms_p50"], 3)
                if base.get("ttft_ms_p50") and ours.get("ttft_ms_p50"):
                    ours[f"ttft_ratio_to_{base['engine']}"] = _round(base["ttft_ms_p50"] / ours["ttft_ms_p50"], 3)
            elif base.get("out_tok_s") and ours.get("out_tok_s"):
                ours[f"ratio_to_{base['engine']}"] = _round(ours["out_tok_s"] / base["out_tok_s"], 3)


def markdown_table(records: list[dict[str, Any]]) -> str:
    def f(x, nd=1):
        return "—" if x is None else f"{x:,.{nd}f}"

    head = records[0] if records else {}
    lines = [f"Offline benchmarks: {head.get('model')} {head.get('dtype')} on {head.get('device')}, "
             f"commit {head.get('commit')}, {head.get('date')}", "",
             "| workload | engine | requests | out tok/s | total tok/s | wall s | TTFT p50 ms | TTFT mean ms "
             "| TPOT p50 ms | of ceiling | vs vLLM | ours vs baseline | errors / note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['workload']} | {r['engine']} | | | | | | | | | | | {r['error'][:120]} |")
            continue
        ratios = ", ".join(f"{k.removeprefix('ratio_to_')} x{v:.2f}" for k, v in r.items() if k.startswith("ratio_to_"))
        frac = r.get("ceiling_fraction")
        scale = r.get("baseline_scale")
        note = f"{r.get('errors')}" + (f"; {scale:g} of the requests" if scale not in (None, 1.0) else "")
        lines.append(
            f"| {r['workload']} | {r['engine']} | {r.get('num_requests')}"
            f"{' x' + str(r['runs']) + ' runs' if r.get('runs', 1) > 1 else ''} | {f(r.get('out_tok_s'))} "
            f"| {f(r.get('total_tok_s'))} | {f(r.get('wall_s'), 2)} | {f(r.get('ttft_ms_p50'), 2)} "
            f"| {f(r.get('ttft_ms_mean'), 2)} | {f(r.get('tpot_ms_p50'), 3)} "
            f"| {'—' if frac is None else f'{100 * frac:.0f} %'} "
            f"| {'—' if r.get('ratio_to_vllm') is None else 'x' + format(r['ratio_to_vllm'], '.2f')} | {ratios or '—'} "
            f"| {note} |")
    return "\n".join(lines) + "\n"


def write_results(records: list[dict[str, Any]], out: Path | None,
                  table: Callable[[list[dict[str, Any]]], str] | None = None) -> None:
    """The records as JSON at ``out`` and ``table(records)`` (markdown) beside it, ``.md``."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(out)  # atomic: a kill mid-write never leaves a truncated file
    out.with_suffix(".md").write_text((table or markdown_table)(records))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt2serve.benchmarks.offline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="W1,W2,W3", help="comma list of W1, W2, W3")
    p.add_argument("--model", default="gpt2-xl")
    p.add_argument("--load-format", default="dummy", choices=["auto", "safetensors", "pt", "dummy"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-model-len", type=int, default=None, help="engine context limit; lengths are clamped to it")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EngineConfig field (value parsed as YAML), repeatable: --engine-arg max_num_seqs=512")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default=None)
    p.add_argument("--enforce-eager", action="store_true", help="pass enforce_eager=True to the engine")
    p.add_argument("--no-ours", action="store_true", help="run only the baselines")
    p.add_argument("--baselines", default="", help=f"comma list of {', '.join(BASELINES)} (default: none)")
    p.add_argument("--baseline-scale", action="append", default=[], metavar="[ENGINE][:W]=FRACTION",
                   help="run a baseline on the first FRACTION of a workload's requests, e.g. 0.25, W2=0.25, "
                        "hf-generate:W2=0.25 (repeatable; the most specific wins). Recorded as baseline_scale.")
    p.add_argument("--hf-generate-w3-runs", type=int, default=W3_RUNS,
                   help="W3 runs of hf-generate (batch 1, dynamic cache: ~27 s a run on an H100); "
                        "hf-generate-static always makes all 5 (~3 s a run once compiled)")
    p.add_argument("--hf-batch-size", type=int, default=128, help="batch size of hf-generate on W1/W2")
    p.add_argument("--scale", type=float, default=1.0, help="shrink request counts and lengths (CPU smoke runs)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip a baseline (recorded as an error) once the job has run this long, or, on an H100 "
                        "with GPT-2 XL, when the HF baselines' H100 figures say it would end past it")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD, or 'unknown')")
    p.add_argument("--out", type=Path, default=None, help="JSON file; the markdown table goes beside it (.md)")
    return p


def _engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = _parse_value(value)
    if args.attention_backend:
        overrides["attention_backend"] = args.attention_backend
    if args.enforce_eager:
        overrides["enforce_eager"] = True
    if args.max_model_len:
        overrides["max_model_len"] = args.max_model_len
    return overrides


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if not workloads:
        raise SystemExit("--workloads is empty")
    for name in workloads:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    for name in baselines:
        if name not in BASELINES:
            raise SystemExit(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    try:
        baseline_scale = parse_baseline_scales(args.baseline_scale)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    from gpt2serve import LLM, EngineConfig
    from gpt2serve.engine.loader import load_hf_config, resolve_device, resolve_dtype, weight_bytes

    config = EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
                          **_engine_overrides(args))
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    hf_config = load_hf_config(config)
    max_model_len = min(config.max_model_len or hf_config.n_positions, hf_config.n_positions)
    dev_name = device_name(device)
    h100_xl = "H100" in dev_name and is_gpt2_xl(hf_config)
    common = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "device": dev_name,
              "commit": args.commit or git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "scale": args.scale}
    suites = {w: build_workload(w, args.scale, hf_config.vocab_size, max_model_len) for w in workloads}
    records: list[dict[str, Any]] = []

    def record(workload: str, engine: str, body: Callable[[], dict[str, Any]], extra: dict[str, Any]) -> None:
        """Run one measurement; any exception becomes an error record and the job goes on."""
        wl = suites[workload]
        rec: dict[str, Any] = {"workload": workload, "engine": engine, **common,
                               "num_requests": wl.num_requests, **extra}
        notes = wl.notes + extra.get("notes", [])
        try:
            measured = body()
            notes += measured.pop("notes", [])
            rec.update(measured)
        except Exception as e:  # noqa: BLE001 - a failing measurement must not end the job
            if not isinstance(e, Skipped):
                traceback.print_exc()
            rec.update(error=f"{type(e).__name__}: {e}", errors=None)
        rec["notes"] = notes
        for key in ("out_tok_s", "total_tok_s", "wall_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50",
                    "tpot_ms_p99"):
            rec.setdefault(key, None)
        rec["ceiling_fraction"] = ceiling_fraction(rec, h100_xl and dtype == torch.float16)
        if rec["ceiling_fraction"] is not None and engine.startswith("ours"):
            rec["ratio_to_vllm"] = ratio_to_vllm(rec)
        records.append(rec)
        write_results(records, args.out)
        log(f"{workload} {engine}: " + (rec.get("error") or
            f"{rec['out_tok_s']} out tok/s, wall {rec['wall_s']} s, TPOT p50 {rec['tpot_ms_p50']} ms, "
            f"errors {rec['errors']}"))

    # ---- ours
    if not args.no_ours:
        log(f"building our engine: {config.model_dump()}")
        ours_extra: dict[str, Any] = {"engine_args": config.model_dump(mode="json")}
        llm, failure = None, ""
        try:
            t = time.perf_counter()
            llm = LLM(config)
            runner = llm.engine.runner
            ours_extra.update(startup_s=_round(time.perf_counter() - t), kv_blocks=runner.num_blocks,
                              block_size=runner.block_size, attention_backend=getattr(runner.backend, "name", None))
            weights, dense = weight_bytes(runner.model, runner.dtype)
            ours_extra.update(weight_gib=_round(weights / 2**30), dense_weight_gib=_round(dense / 2**30),
                              kv_tokens=runner.num_blocks * runner.block_size)
            t = time.perf_counter()
            warm_up_engine(llm)
            ours_extra["warmup_s"] = _round(time.perf_counter() - t)
            log(f"engine up in {ours_extra['startup_s']} s, warm-up {ours_extra['warmup_s']} s: "
                f"{runner.num_blocks} KV blocks of {runner.block_size} tokens")
            del runner
        except Exception as e:  # noqa: BLE001 - still run the baselines
            traceback.print_exc()
            failure = f"engine start-up or warm-up failed: {type(e).__name__}: {e}"
            llm = None
        for w in workloads:
            body = functools.partial(run_ours, llm, suites[w], device) if llm is not None else \
                functools.partial(_fail, failure)
            if w == "W5":
                # The same engine with prefix caching switched off, on a prefix of its own.
                off = build_workload(w, args.scale, hf_config.vocab_size, max_model_len, variant=1)
                record(w, "ours", functools.partial(run_ours_caching, llm, suites[w], device, True)
                       if llm is not None else body, {**ours_extra, "prefix_caching": True})
                record(w, "ours-no-prefix-caching", functools.partial(run_ours_caching, llm, off, device, False)
                       if llm is not None else body, {**ours_extra, "prefix_caching": False})
                continue
            record(w, "ours", body, ours_extra)
        # The KV pool holds most of the GPU: drop the engine (and the last partial that points at it) before HF
        # needs the memory.
        del llm, body
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            log(f"engine freed: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB still allocated")

    # ---- baselines: transformers' static-cache compile last, so it cannot affect the others
    jobs = [(w, b) for b in BASELINES for w in workloads if b in baselines and b in BASELINES_FOR[w]]
    if jobs:
        import transformers

        try:
            model, weights = build_hf_model(config, hf_config, device, dtype)
        except Exception as e:  # noqa: BLE001 - record why every baseline is missing, keep ours
            traceback.print_exc()
            model, weights = None, f"HF model build failed: {type(e).__name__}: {e}"
        for w, b in jobs:
            frac = baseline_scale(b, w)
            wl = suites[w]
            if w == "W3":
                sub = wl.head(args.hf_generate_w3_runs if b == "hf-generate" else wl.runs)
                notes = [f"--hf-generate-w3-runs {sub.runs}: median of {sub.runs} runs"] if sub.runs != wl.runs else []
                batch = 1
            elif b == "hf-generate":
                sub, picked = sample_static_batches(wl, args.hf_batch_size, frac)
                notes = [f"--baseline-scale {frac:g}: {picked}"]
                batch = args.hf_batch_size
            else:
                sub = wl.head(max(1, int(round(len(wl.prompts) * frac))))
                notes = [f"--baseline-scale {frac:g}: first {len(sub.prompts)} of {len(wl.prompts)} requests "
                         "(fewer requests in flight than the full workload)"]
                batch = None  # HF's scheduler decides
            # The fraction actually run (a plan of one batch cannot be cut); 1.0 means the whole workload.
            effective = None if w == "W3" else round(len(sub.prompts) / len(wl.prompts), 4)
            if effective == 1.0:
                notes = []
            attn = "paged|sdpa" if b == "hf-generate_batch" else "sdpa"
            extra = {"engine_args": {"transformers": transformers.__version__, "attn_implementation": attn,
                                     "batch_size": batch, "weights": weights},
                     "baseline_scale": effective, "notes": notes, "num_requests": sub.num_requests}
            elapsed = time.perf_counter() - started
            expect = expected_seconds(b, sub, h100_xl, args.hf_batch_size)
            if model is None:
                record(w, b, functools.partial(_fail, weights), extra)
            elif args.deadline_s is not None and elapsed + expect > args.deadline_s:
                msg = (f"--deadline-s {args.deadline_s:g}: at {elapsed:.0f} s, expected {expect:.0f} s more "
                       "(the HF baselines' H100 figures)")
                record(w, b, functools.partial(_skip, msg), extra)
            else:
                log(f"{w} {b}: {len(sub.prompts)} requests/runs, expected ~{expect:.0f} s")
                record(w, b, functools.partial(run_baseline, b, model, sub, device, args.hf_batch_size), extra)
        del model
        gc.collect()

    add_ratios(records)
    write_results(records, args.out)
    table = markdown_table(records)
    print(table)
    log(f"done in {time.perf_counter() - started:.0f} s" + (f"; wrote {args.out} and {args.out.with_suffix('.md')}"
                                                             if args.out else ""))
    return records


if __name__ == "__main__":
    main()
