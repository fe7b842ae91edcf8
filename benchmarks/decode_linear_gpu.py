#!/usr/bin/env python
"""Fused decode linear layers (kernels/decode_linear.py) vs the unfused PyTorch sequence, at GPT-2 XL shapes.

    python benchmarks/decode_linear_gpu.py [--out decode_linear.json] [--no-sweep] [--sweep-budget-s 70]
                                           [--sweep-m1] [--dtype float16] [--small]

Needs only torch + triton. On a GPU it:
  1. checks ``fused_linear`` against the fp32 reference for the four XL layers (each with the fusions the model
     uses: LN1+c_attn+bias, attn.c_proj+bias+residual, LN2+c_fc+bias+gelu, mlp.c_proj+bias+residual) at M = 1, 4,
     5, 10, 16 in fp16 and bf16, outputs pre-filled with NaN; also every code path / split mode at one shape, and
     that the serial and two-pass split-K reductions agree bit for bit. Max relative error must be <= 1e-2.
  2. times each fused layer and the unfused PyTorch ops it replaces (and F.linear alone, i.e. cuBLAS), at
     M = 1, 5, 10, 16 (speculative decoding verifies k = 4 proposals: 5 rows a request; 20 rows exceed the
     fused kernel's 16, so batch 4 is timed as 16): triton.testing.do_bench (median; it flushes L2 before every call) and inside a CUDA graph
     (100 calls back to back, cycling through enough weight copies that they cannot sit in the 50 MB L2 -- as
     in the model, where every layer has its own weights). Reports us and weight bandwidth (bytes / time, and
     the fraction of 3.0 TB/s).
  3. times a whole layer's four linears (fused vs unfused; attention excluded) as 48 layers in one CUDA graph,
     i.e. the projected decode-step total of GPT-2 XL's linears, at M = 1, 4, 5, 10, 16; for M > 1 also the
     batched path's two-pass reduction and the older "dot" path. Reports ms per 48 layers and the fraction of the
     weight-read floor (this script's: the linears' bytes at 3.0 TB/s; and the whole model's 1.04 ms).
  4. unless --no-sweep, sweeps tile configs (BLOCK_N, BLOCK_K, num_warps, num_stages), then split-K count /
     mode / eviction hint for the best, per layer at M = 5 (the batched path, bucket 16) and then M = 4 (and,
     with --sweep-m1, first M = 1 over the fma and dot paths), under a compile-time budget; prints the best per
     shape and a TUNED_CONFIGS dict to paste into kernels/decode_linear.py.
Prints a table; --out writes everything as JSON. Exit status 1 if a correctness check fails.
--small shrinks the shapes so the script runs on a CPU under TRITON_INTERPRET=1 (a smoke test of the script;
its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from gpt2serve.kernels import decode_linear as dl  # noqa: E402

PEAK_BYTES_PER_S = 3.0e12  # H100 SXM, measured copy bandwidth
L2_DEFEAT_BYTES = 200e6  # weight copies per timed graph: ~4x the H100's 50 MB L2
TOL = 1e-2
MS = (1, 4, 5, 10, 16)  # correctness
MS_KERNELS = (1, 5, 10, 16)  # per-kernel timing; 20 rows (batch 4 x 5) exceed MAX_M: timed as 16
MS_LAYER = (1, 4, 5, 10, 16)  # 48-layer timing (4 and 16: the rows of the earlier results)
N_LAYERS = 48
MODEL_FLOOR_MS = 1.04  # GPT-2 XL's 3.1 GB of weights at 3.0 TB/s: a whole forward pass's weight read


def layer_specs(small: bool) -> dict:
    h = 64 if small else 1600
    return {  # name: (K, N, fusions)
        "c_attn": (h, 3 * h, dict(ln=True, bias=True, gelu=False, res=False)),
        "attn.c_proj": (h, h, dict(ln=False, bias=True, gelu=False, res=True)),
        "c_fc": (h, 4 * h, dict(ln=True, bias=True, gelu=True, res=False)),
        "mlp.c_proj": (4 * h, h, dict(ln=False, bias=True, gelu=False, res=True)),
    }


class Problem:
    """Inputs of one layer at one batch size, with ``copies`` distinct weight matrices (to defeat L2)."""

    def __init__(self, k, n, flags, m, dtype, device, copies=1, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape, scale=1.0, offset=0.0):
            return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale + offset).to(dtype)

        self.k, self.n, self.m, self.flags = k, n, m, flags
        self.x = rnd(m, k, scale=2.0, offset=0.3)
        self.weights = [rnd(n, k, scale=k ** -0.5) for _ in range(copies)]
        self.bias = rnd(n) if flags["bias"] else None
        self.ln_w = rnd(k, scale=0.2, offset=1.0) if flags["ln"] else None
        self.ln_b = rnd(k, scale=0.2) if flags["ln"] else None
        self.res = rnd(m, n) if flags["res"] else None
        self.out = torch.empty(m, n, dtype=dtype, device=device)

    @property
    def weight_bytes(self) -> int:
        return self.weights[0].numel() * self.weights[0].element_size()

    def kwargs(self):
        return dict(bias=self.bias, ln_weight=self.ln_w, ln_bias=self.ln_b,
                    activation="gelu_tanh" if self.flags["gelu"] else None, residual=self.res)

    def fused(self, i=0, config=None):
        return dl.fused_linear(self.x, self.weights[i], **self.kwargs(), out=self.out, config=config)

    def unfused(self, i=0):
        h = self.x
        if self.ln_w is not None:
            h = F.layer_norm(h, (self.k,), self.ln_w, self.ln_b, 1e-5)
        y = F.linear(h, self.weights[i], self.bias)
        if self.flags["gelu"]:
            y = F.gelu(y, approximate="tanh")
        if self.res is not None:
            y = y + self.res
        return y

    def linear_only(self, i=0):
        return F.linear(self.x, self.weights[i])

    def reference(self, i=0):
        return dl.fused_linear_ref(self.x, self.weights[i], **self.kwargs())


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def copies_for(weight_bytes: int, small: bool) -> int:
    return 2 if small else max(2, math.ceil(L2_DEFEAT_BYTES / weight_bytes))


# ------------------------------------------------------------------------------------------------ timing


def time_do_bench(fn, quick=False) -> float:
    """Median us per call; do_bench zeroes a 256 MB buffer before every call, so weights come from HBM."""
    if not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return triton.testing.do_bench(fn, warmup=10 if quick else 20, rep=25 if quick else 50,
                                   return_mode="median") * 1e3


def capture_calls(calls, n_calls: int, warm_up: int = 3) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``n_calls`` calls cycling through ``calls``, after an eager warm-up of the first
    ``warm_up`` on a side stream (it compiles, and allocates the split-K workspace), replayed once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls[: min(warm_up, len(calls))]:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(n_calls):
            calls[j % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def time_graph(calls, n_calls=100, replays=10) -> float:
    """us per call: ``n_calls`` calls (cycling through ``calls``) captured into one CUDA graph, replayed;
    median over replays. Matches how the engine runs decode (graph replay, no launch overhead on the host)."""
    if not torch.cuda.is_available():  # --small on a CPU: exercise the code, the number means nothing
        t = time.perf_counter()
        for j in range(min(n_calls, 2)):
            calls[j % len(calls)]()
        return (time.perf_counter() - t) * 1e6 / min(n_calls, 2)
    graph = capture_calls(calls, n_calls)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_calls)
    del graph
    return statistics.median(times)


def bw(weight_bytes, us):
    if not us or us != us:  # 0 or NaN
        return None, None
    gbs = weight_bytes / (us * 1e-6) / 1e9
    return round(gbs, 1), round(gbs * 1e9 / PEAK_BYTES_PER_S, 3)


# ------------------------------------------------------------------------------------------------ sections


def check_correctness(specs, device, small) -> list[dict]:
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        if not torch.cuda.is_available() and dtype == torch.bfloat16:
            continue  # the interpreter truncates when casting to bf16
        for name, (k, n, flags) in specs.items():
            for m in MS:
                p = Problem(k, n, flags, m, dtype, device, seed=m)
                p.out.fill_(float("nan"))
                y = p.fused()
                err = rel_err(y, p.reference()) if torch.isfinite(y).all() else float("inf")
                rows.append(dict(check=f"{name} M={m}", dtype=str(dtype).replace("torch.", ""),
                                 config=dl.resolve_config(m, n, k, device), rel_err=err, ok=err <= TOL))
    # Every path and split mode at the largest-K shape, with every fusion on.
    k, n, _ = specs["mlp.c_proj"]
    all_on = dict(ln=True, bias=True, gelu=True, res=True)
    variants = [
        {"path": "dot", "split": 1}, {"path": "dot", "split": 6, "split_mode": "serial"},
        {"path": "dot", "split": 6, "split_mode": "two_pass"}, {"path": "fma", "split": 1},
        {"path": "fma", "split": 5, "split_mode": "serial"}, {"path": "fma", "split": 5, "split_mode": "two_pass"},
        {"path": "fma", "split": 3, "prefetch": False}, {"path": "dot", "split": 4, "w_evict": ""},
        {"path": "batched", "split": 1}, {"path": "batched", "split": 6, "split_mode": "serial"},
        {"path": "batched", "split": 6, "split_mode": "two_pass"},
    ]
    for cfg in variants:
        m = 1 if cfg["path"] == "fma" else 5
        p = Problem(k, n, all_on, m, torch.float16, device, seed=11)
        p.out.fill_(float("nan"))
        y = p.fused(config=cfg).clone()
        err = rel_err(y, p.reference()) if torch.isfinite(y).all() else float("inf")
        ok = err <= TOL
        if cfg["split"] > 1:  # the other reduction mode must give the same bits
            other = {**cfg, "split_mode": "two_pass" if cfg.get("split_mode", "serial") == "serial" else "serial"}
            ok = ok and torch.equal(y, p.fused(config=other))
        rows.append(dict(check=f"all fusions M={m} {cfg}", dtype="float16", config=cfg, rel_err=err, ok=ok))
    return rows


def bench_kernels(specs, device, dtype, small) -> list[dict]:
    rows = []
    for name, (k, n, flags) in specs.items():
        for m in MS_KERNELS:
            copies = copies_for(n * k * torch.tensor([], dtype=dtype).element_size(), small)
            p = Problem(k, n, flags, m, dtype, device, copies=copies)
            wb = p.weight_bytes
            rec = dict(layer=name, M=m, K=k, N=n, dtype=str(dtype).replace("torch.", ""), weight_bytes=wb,
                       config=dl.resolve_config(m, n, k, device))
            rec["fused_us"] = time_do_bench(lambda: p.fused())
            rec["unfused_us"] = time_do_bench(lambda: p.unfused())
            rec["linear_only_us"] = time_do_bench(lambda: p.linear_only())
            rec["fused_graph_us"] = time_graph([lambda i=i: p.fused(i) for i in range(copies)])
            rec["unfused_graph_us"] = time_graph([lambda i=i: p.unfused(i) for i in range(copies)])
            rec["linear_only_graph_us"] = time_graph([lambda i=i: p.linear_only(i) for i in range(copies)])
            for key in ("fused_us", "unfused_us", "linear_only_us", "fused_graph_us", "unfused_graph_us",
                        "linear_only_graph_us"):
                rec[key.replace("_us", "_gbs")], rec[key.replace("_us", "_frac")] = bw(wb, rec[key])
            rows.append(rec)
            del p
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def bench_layer(specs, device, dtype, small) -> list[dict]:
    """48 layers' worth of the four linears in one CUDA graph (distinct weight sets cycled to defeat L2);
    attention is not included (a fixed tensor stands in for its output)."""
    k_h = specs["c_attn"][0]
    layer_bytes = sum(k * n for k, n, _ in specs.values()) * torch.tensor([], dtype=dtype).element_size()
    n_sets = 2 if small else max(2, math.ceil(L2_DEFEAT_BYTES / layer_bytes))
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale + offset).to(dtype)

    sets = []
    for _ in range(n_sets):
        sets.append({name: dict(w=rnd(n, k, scale=k ** -0.5), b=rnd(n) * 0.1,
                                ln_w=rnd(k, scale=0.1, offset=1.0) if f["ln"] else None,
                                ln_b=rnd(k, scale=0.1) if f["ln"] else None)
                     for name, (k, n, f) in specs.items()})
    rows = []
    for m in MS_LAYER:
        h_bufs = [rnd(m, k_h), torch.empty(m, k_h, dtype=dtype, device=device)]
        attn = rnd(m, k_h)  # stand-in for the attention output
        qkv = torch.empty(m, specs["c_attn"][1], dtype=dtype, device=device)
        h1 = torch.empty(m, k_h, dtype=dtype, device=device)
        fc = torch.empty(m, specs["c_fc"][1], dtype=dtype, device=device)

        def fused_layer(i, cfg=None):
            s = sets[i % n_sets]
            h_in, h_out = h_bufs[i % 2], h_bufs[(i + 1) % 2]
            a, p, f, p2 = s["c_attn"], s["attn.c_proj"], s["c_fc"], s["mlp.c_proj"]
            dl.fused_linear(h_in, a["w"], a["b"], ln_weight=a["ln_w"], ln_bias=a["ln_b"], out=qkv, config=cfg)
            dl.fused_linear(attn, p["w"], p["b"], residual=h_in, out=h1, config=cfg)
            dl.fused_linear(h1, f["w"], f["b"], ln_weight=f["ln_w"], ln_bias=f["ln_b"], activation="gelu_tanh",
                            out=fc, config=cfg)
            dl.fused_linear(fc, p2["w"], p2["b"], residual=h1, out=h_out, config=cfg)

        def fused_stack(cfg=None):
            for i in range(N_LAYERS):
                fused_layer(i, cfg)

        def unfused_layer(i, h_in):
            s = sets[i % n_sets]
            a, p, f, p2 = s["c_attn"], s["attn.c_proj"], s["c_fc"], s["mlp.c_proj"]
            F.linear(F.layer_norm(h_in, (k_h,), a["ln_w"], a["ln_b"], 1e-5), a["w"], a["b"])  # qkv -> attention
            x1 = F.linear(attn, p["w"], p["b"]) + h_in
            g = F.gelu(F.linear(F.layer_norm(x1, (k_h,), f["ln_w"], f["ln_b"], 1e-5), f["w"], f["b"]),
                       approximate="tanh")
            return F.linear(g, p2["w"], p2["b"]) + x1

        def unfused_stack(n_layers=N_LAYERS):
            h = h_bufs[0]
            for i in range(n_layers):
                h = unfused_layer(i, h)

        rec = dict(M=m, dtype=str(dtype).replace("torch.", ""), layer_weight_bytes=layer_bytes, layers=N_LAYERS,
                   path=dl.resolve_config(m, specs["c_attn"][1], k_h, device)["path"])

        def time_stack(cfg=None):
            if torch.cuda.is_available():
                return time_graph([lambda: fused_stack(cfg)], n_calls=1, replays=20)
            return time_do_bench(lambda: [fused_layer(i, cfg) for i in range(2)]) * N_LAYERS / 2  # interpreter

        fused_us = time_stack()
        if torch.cuda.is_available():
            unfused_us = time_graph([unfused_stack], n_calls=1, replays=20)
        else:  # interpreter: two layers, scaled
            unfused_us = time_do_bench(lambda: unfused_stack(2)) * N_LAYERS / 2
        if m > 1:  # the alternatives at the same rows: batched with the atomic-free reduction, the older dot path
            rec["batched_two_pass_48_ms"] = time_stack({"path": "batched", "split_mode": "two_pass"}) / 1e3
            rec["dot_48_ms"] = time_stack({"path": "dot"}) / 1e3
        rec.update(fused_48_ms=fused_us / 1e3, unfused_48_ms=unfused_us / 1e3,
                   fused_layer_us=fused_us / N_LAYERS, unfused_layer_us=unfused_us / N_LAYERS,
                   ideal_48_ms=N_LAYERS * layer_bytes / PEAK_BYTES_PER_S * 1e3,
                   speedup=unfused_us / fused_us if fused_us else None)
        rec["fused_frac_of_peak"] = rec["ideal_48_ms"] / rec["fused_48_ms"] if fused_us else None
        rec["fused_frac_of_model_floor"] = MODEL_FLOOR_MS / rec["fused_48_ms"] if fused_us else None
        rec["unfused_frac_of_model_floor"] = MODEL_FLOOR_MS / rec["unfused_48_ms"] if unfused_us else None
        rows.append(rec)
    return rows


TILE_CANDIDATES = {
    "fma": [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=1)
            for bn, bk, nw in [(4, 1024, 4), (8, 1024, 4), (2, 1024, 4), (8, 512, 2), (4, 2048, 8), (16, 256, 4)]],
    "dot": [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
            for bn, bk, nw, ns in [(64, 128, 4, 4), (64, 256, 4, 3), (64, 64, 4, 6), (128, 128, 4, 4),
                                   (128, 128, 8, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 2)]],
    "batched": [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                for bn, bk, nw, ns in [(64, 128, 4, 4), (64, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
                                       (128, 128, 4, 4), (128, 128, 8, 3), (64, 64, 4, 6), (128, 64, 8, 6)]],
}
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)


def sweep(specs, device, dtype, budget_s, small, with_m1=False) -> tuple[list[dict], dict]:
    """Graph-timed sweep. Stage 1: tile configs with the automatic split; stage 2: split count, split mode,
    eviction hint (and prefetch for fma) around the stage-1 winner. Stops when the budget is spent."""
    t_end = time.perf_counter() + budget_s
    results, best = [], {}
    n_calls, replays = (2, 1) if small else (50, 5)

    def measure(p, copies, cfg):
        try:
            return time_graph([lambda i=i: p.fused(i, config=cfg) for i in range(copies)], n_calls, replays)
        except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory): skip it
            print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
            return float("inf")

    # M=5 (speculative verify; the batched path, bucket 16) per layer, then M=4 (bucket 4) re-timing M=5's best
    # tiles; M=1 (fma / dot, already tuned) only on request. M is not specialised, so binaries are shared.
    plan = ([(name, 1) for name in specs] if with_m1 else []) + [(name, 5) for name in specs]
    plan += [(name, 4) for name in specs]
    for name, m in plan:
        if time.perf_counter() > t_end:
            print(f"sweep budget spent; skipped {name} M={m} and later")
            break
        k, n, flags = specs[name]
        probe_bytes = n * k * torch.tensor([], dtype=dtype).element_size()
        copies = copies_for(probe_bytes, small)
        p = Problem(k, n, flags, m, dtype, device, copies=copies)
        paths = ["fma", "dot"] if m == 1 else ["batched"]
        if m == 4 and (name, 5) in best:  # only re-time M=5's three best tiles
            cands = [r["config"] for r in sorted((r for r in results if r["layer"] == name and r["M"] == 5
                                                  and isinstance(r["config"], dict)), key=lambda r: r["us"])[:3]]
        else:
            cands = [{"path": path, **t} for path in paths for t in TILE_CANDIDATES[path]]
            if small:
                cands = cands[:2]
        stage = []
        default_us = measure(p, copies, None)  # what the shipped defaults give, for comparison
        results.append(dict(layer=name, M=m, config="default", resolved=dl.resolve_config(m, n, k, device),
                            us=default_us, gbs=bw(p.weight_bytes, default_us)[0]))
        for cfg in cands:
            if time.perf_counter() > t_end:
                break
            cfg = {**cfg, "split": "auto"}
            us = measure(p, copies, cfg)
            resolved = dl.resolve_config(m, n, k, device, cfg)
            stage.append((us, cfg))
            results.append(dict(layer=name, M=m, config=cfg, resolved=resolved, us=us,
                                gbs=bw(p.weight_bytes, us)[0]))
        if not stage:
            break
        _, base = min(stage, key=lambda t: t[0])
        variants = [{**base, "split": s} for s in SPLITS]
        variants += [{**base, "split_mode": "two_pass"}, {**base, "w_evict": ""}]
        if base["path"] == "fma":
            variants.append({**base, "prefetch": False})
        for cfg in variants:
            if time.perf_counter() > t_end:
                break
            if cfg.get("split", 1) != "auto" and cfg["split"] > triton.cdiv(k, base["block_k"]):
                continue
            us = measure(p, copies, cfg)
            stage.append((us, cfg))
            results.append(dict(layer=name, M=m, config=cfg, resolved=dl.resolve_config(m, n, k, device, cfg),
                                us=us, gbs=bw(p.weight_bytes, us)[0]))
        us_best, cfg_best = min(stage, key=lambda t: t[0])
        resolved = dl.resolve_config(m, n, k, device, cfg_best)
        best[(name, m)] = dict(layer=name, M=m, K=k, N=n, us=us_best, gbs=bw(p.weight_bytes, us_best)[0],
                               frac=bw(p.weight_bytes, us_best)[1], config=resolved, default_us=default_us)
        print(f"  sweep {name:12} M={m:2d}: default {default_us:7.2f} us, best {us_best:7.2f} us "
              f"({best[(name, m)]['gbs']} GB/s) {resolved}")
        del p
    tuned = {(b["K"], b["N"], dl._m_bucket(m)): b["config"] for (name, m), b in best.items()}
    if not any(m == 4 for _, m in best):  # bucket 4 not swept: M=5's winner has the same tile shape
        tuned.update({(b["K"], b["N"], 4): b["config"] for (name, m), b in best.items() if m == 5})
    return results, tuned


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-budget-s", type=float, default=70.0)
    ap.add_argument("--sweep-m1", action="store_true", help="also sweep M=1 (fma / dot paths)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test under the interpreter)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        print("no GPU: use --small for a smoke test under the Triton interpreter")
        return 2
    dtype = getattr(torch, args.dtype)
    specs = layer_specs(args.small)
    t0 = time.perf_counter()
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
                  defaults=dict(dot=dl.DOT_CONFIG, fma=dl.FMA_CONFIG),
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)

    print(f"== correctness ({report['device']}, torch {torch.__version__}, triton {triton.__version__})")
    checks = check_correctness(specs, device, args.small)
    report["correctness"] = checks
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['dtype']:9} {c['check']:40.40} rel_err {c['rel_err']:.2e}")
    all_ok = all(c["ok"] for c in checks)
    dump()
    print(f"   ({time.perf_counter() - t0:.0f} s)")

    print("== kernels (us; GB/s of weight; fraction of 3.0 TB/s)")
    kernels = bench_kernels(specs, device, dtype, args.small)
    report["kernels"] = kernels
    dump()
    print(f"   ({time.perf_counter() - t0:.0f} s)")

    print("== layer (4 linears, 48 layers in one graph)")
    layers = bench_layer(specs, device, dtype, args.small)
    report["layer"] = layers
    dump()
    print(f"   ({time.perf_counter() - t0:.0f} s)")

    if not args.no_sweep:
        print(f"== sweep (budget {args.sweep_budget_s:.0f} s)")
        results, tuned = sweep(specs, device, dtype, args.sweep_budget_s, args.small, args.sweep_m1)
        report["sweep"] = results
        report["suggested_tuned_configs"] = {str(key): v for key, v in tuned.items()}
        dump()

    # ---- summary table
    print()
    print(f"{'layer':12} {'M':>2} | {'fused':>7} {'GB/s':>6} {'frac':>5} | {'unfused':>7} {'cuBLAS':>7} | "
          f"{'fusedG':>7} {'frac':>5} | {'unfusedG':>8} {'cuBLAS_G':>8} | {'speedupG':>8}")
    for r in kernels:
        sp = r["unfused_graph_us"] / r["fused_graph_us"] if r["fused_graph_us"] else float("nan")
        print(f"{r['layer']:12} {r['M']:2d} | {r['fused_us']:7.2f} {r['fused_gbs'] or 0:6.0f} "
              f"{r['fused_frac'] or 0:5.2f} | {r['unfused_us']:7.2f} {r['linear_only_us']:7.2f} | "
              f"{r['fused_graph_us']:7.2f} {r['fused_graph_frac'] or 0:5.2f} | {r['unfused_graph_us']:8.2f} "
              f"{r['linear_only_graph_us']:8.2f} | {sp:8.2f}x")
    print("(us per call; G = 100 calls in one CUDA graph, L2 defeated; cuBLAS = F.linear alone, no bias/LN/...)")
    print()
    for r in layers:
        print(f"{N_LAYERS} layers of linears, M={r['M']:2d} ({r['path']}): fused {r['fused_48_ms']:.3f} ms "
              f"({r['fused_layer_us']:.1f} us/layer), unfused {r['unfused_48_ms']:.3f} ms "
              f"({r['unfused_layer_us']:.1f} us/layer), speedup {r['speedup'] or 0:.2f}x; "
              f"weight-read floor {r['ideal_48_ms']:.3f} ms ({(r['fused_frac_of_peak'] or 0) * 100:.0f}% of it), "
              f"model floor {MODEL_FLOOR_MS} ms: fused {(r['fused_frac_of_model_floor'] or 0) * 100:.0f}%, "
              f"unfused {(r['unfused_frac_of_model_floor'] or 0) * 100:.0f}%")
        if "dot_48_ms" in r:
            print(f"      alternatives at M={r['M']:2d}: batched two-pass {r['batched_two_pass_48_ms']:.3f} ms, "
                  f"old dot path {r['dot_48_ms']:.3f} ms")
    if "suggested_tuned_configs" in report:
        print("\n# sweep winners -> paste into kernels/decode_linear.py (key: (K, N, m_bucket)):")
        print("TUNED_CONFIGS = {")
        for key, cfg in tuned.items():
            print(f"    {key}: {cfg},")
        print("}")
    print(f"\ncorrectness: {'all ok' if all_ok else 'FAILURES'}; total {time.perf_counter() - t0:.0f} s")
    dump()
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
