#!/usr/bin/env python
"""Multi-LoRA overhead per linear layer (kernels/lora.py) at GPT-2 XL shapes.

    python benchmarks/lora_gpu.py [--out lora.json] [--rank 16] [--slots 4] [--ts 1,8,32,256,2048]
                                  [--no-adapter-frac 0.0] [--dtype float16] [--small]

Needs only torch + triton. On a GPU, for each of XL's four linear shapes (c_attn 1600->4800, attn.c_proj
1600->1600, c_fc 1600->6400, mlp.c_proj 6400->1600) and each T (token rows of a step):
  1. checks ``apply_lora`` (y0 + delta) against y0 + ``lora_delta_ref`` (fp32); max relative error must be <= 1e-3
     (fp16) and rows without adapter must come back bit-identical;
  2. times, as CUDA-graph replays (``decode_linear_gpu.time_graph``: 100 calls in one graph, CUDA events, median
     over replays; weight copies cycled so they cannot sit in the 50 MB L2):
       - ``base``: the layer's fp16 ``F.linear`` (no bias) -- what the LoRA is an overhead on,
       - ``lora``: ``apply_lora`` with this step's segments precomputed (how the engine calls it: one grouping per
         step, shared by all layers), adapter stacks cycled likewise; ``ratio`` = lora / base,
       - ``shrink`` and ``expand`` alone (the two launches of ``lora``),
       - ``segments``: ``lora_segments`` alone (paid once per step, not per layer),
       - for T <= 64 both row-tiling paths (``masked``, ``sorted``), to place ``MASKED_MAX_ROWS``.
  3. ``--section decode`` (also in the default ``all``): the decode layers as the engine runs them inside its CUDA
     graphs (``engine.layers.linear.Linear`` with GPT-2's fusion per layer: LayerNorm for c_attn and c_fc, GELU
     for c_fc, the residual for the c_proj layers) at T = 1, 4, 8: ``plain`` (no LoRA: the fused decode linear),
     ``fused_lora`` (one kernel: the fused linear's producer programs compute the shrink, LayerNorm folded in,
     and its epilogue adds the delta), ``two_launch_lora`` (the shrink as a kernel of its own before the fused
     linear, whose epilogue adds its result), ``unfused_lora`` (the earlier path: separate LayerNorm / GELU / residual
     ops around apply_lora); each checked against the fp32 reference. ``overhead`` = fused_lora - plain: what an adapter adds per layer.
  4. ``--section lora-configs`` (not in ``all``): the one-row decode layers with an in-kernel LoRA shrink under each
     of ``LORA_CONFIG_CANDIDATES`` (``kernels.decode_linear.TUNED_LORA_CONFIGS`` is filled from its winners).
Slot ids are random over the ``--slots`` adapters, interleaved, with ``--no-adapter-frac`` of the rows set to -1.
x and y are the same tensors in every call of a graph (L2-warm, as after the base linear that just wrote y).
Prints a markdown table; --out writes everything as JSON. Exit status 1 if a correctness check fails.
--small shrinks the shapes so the script runs on a CPU under TRITON_INTERPRET=1 (a smoke test of the script;
its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from gpt2serve.benchmarks.decode_linear_gpu import L2_DEFEAT_BYTES, capture_calls, rel_err, time_graph  # noqa: E402
from gpt2serve.kernels import lora  # noqa: E402

TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
MAX_COPIES = 256


def layer_shapes(small: bool) -> dict:
    h = 64 if small else 1600
    return {"c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, 4 * h), "mlp.c_proj": (4 * h, h)}


def copies_for(nbytes: int, small: bool) -> int:
    return 2 if small else max(2, min(MAX_COPIES, math.ceil(L2_DEFEAT_BYTES / nbytes)))


class Case:
    """One layer shape at one T: x, y0, slot ids and their segments, and ``copies`` distinct base weights and
    adapter stacks."""

    def __init__(self, k, n, t, rank, slots, no_adapter_frac, dtype, device, small, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape, scale=1.0, offset=0.0):
            return (torch.randn(*shape, generator=gen, device=device) * scale + offset).to(dtype)

        self.k, self.n, self.t = k, n, t
        self.x = rnd(t, k, scale=2.0, offset=0.3)
        self.y0 = rnd(t, n)
        self.y = self.y0.clone()
        ids = torch.randint(0, slots, (t,), generator=gen, device=device, dtype=torch.int32)
        drop = torch.rand(t, generator=gen, device=device) < no_adapter_frac
        self.ids = torch.where(drop, torch.full_like(ids, -1), ids)
        self.segs = lora.lora_segments(self.ids, slots)
        elt = torch.tensor([], dtype=dtype).element_size()
        self.n_w = copies_for(n * k * elt, small)
        self.n_ab = copies_for(slots * rank * (k + n) * elt, small)
        self.weights = [rnd(n, k, scale=k ** -0.5) for _ in range(self.n_w)]
        self.a = [rnd(slots, rank, k, scale=k ** -0.5) for _ in range(self.n_ab)]
        self.b = [rnd(slots, n, rank, scale=rank ** -0.5) for _ in range(self.n_ab)]

    def base(self, i):
        F.linear(self.x, self.weights[i % self.n_w], out=self.y)

    def lora(self, i, config=None):
        j = i % self.n_ab
        lora.apply_lora(self.x, self.y, self.a[j], self.b[j], self.ids, segments=self.segs, config=config)


def check(case: Case, dtype) -> dict:
    y = case.y0.clone()
    lora.apply_lora(case.x, y, case.a[0], case.b[0], case.ids, segments=case.segs)
    ref = case.y0.float() + lora.lora_delta_ref(case.x, case.a[0], case.b[0], case.ids)
    err = rel_err(y, ref) if torch.isfinite(y).all() else float("inf")
    none = case.ids < 0
    untouched = bool(torch.equal(y[none], case.y0[none]))
    return dict(rel_err=err, untouched_ok=untouched, ok=err <= TOL[dtype] and untouched)


def bench_case(case: Case, rank: int, slots: int, small: bool) -> dict:
    graph_kw = dict(n_calls=2, replays=1) if small else dict(n_calls=100, replays=10)
    cfg = lora.resolve_config(case.t, case.k, case.n, rank, slots, case.x.device)
    rec = dict(path=cfg["path"], config=cfg)
    rec["base_us"] = time_graph([lambda i=i: case.base(i) for i in range(case.n_w)], **graph_kw)
    rec["lora_us"] = time_graph([lambda i=i: case.lora(i) for i in range(case.n_ab)], **graph_kw)
    rec["ratio"] = rec["lora_us"] / rec["base_us"] if rec["base_us"] else None

    # The two launches of apply_lora separately, on preallocated partials.
    segs = case.segs if cfg["path"] == "sorted" else None
    h_parts = torch.empty(cfg["shrink"]["split"], case.t, rank, dtype=torch.float32, device=case.x.device)
    lora._launch_shrink(case.x, case.a[0], case.ids, segs, h_parts, cfg)  # expand reads written partials

    def shrink(i):
        lora._launch_shrink(case.x, case.a[i % case.n_ab], case.ids, segs, h_parts, cfg)

    def expand(i):
        lora._launch_expand(h_parts, case.b[i % case.n_ab], case.ids, segs, case.y, cfg)

    rec["shrink_us"] = time_graph([lambda i=i: shrink(i) for i in range(case.n_ab)], **graph_kw)
    rec["expand_us"] = time_graph([lambda i=i: expand(i) for i in range(case.n_ab)], **graph_kw)
    rec["segments_us"] = time_graph([lambda: lora.lora_segments(case.ids, slots)], **graph_kw)
    if case.t <= 64:
        for path in ("masked", "sorted"):
            rec[f"{path}_us"] = time_graph([lambda i=i: case.lora(i, {"path": path}) for i in range(case.n_ab)],
                                           **graph_kw)
    return rec


# GPT-2's fusion of each decode layer: (LayerNorm before, activation, residual after).
DECODE_FUSION = {"c_attn": (True, None, False), "attn.c_proj": (False, None, True),
                 "c_fc": (True, "gelu_tanh", False), "mlp.c_proj": (False, None, True)}


def _graph_output(fn):
    """fn's result when captured and replayed (the Linear's fused paths run only under capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out.clone()


def kernel_us(calls, n_calls: int = 20, replays: int = 5) -> dict[str, float]:
    """GPU time per call of each kernel, by name: torch.profiler over replays of a CUDA graph of ``n_calls``
    calls (cycling through ``calls``). Next to ``time_graph``'s time per call, it shows what is kernel time and
    what is the gaps between the graph's kernels."""
    from torch.profiler import ProfilerActivity, profile

    graph = capture_calls(calls, n_calls, warm_up=1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if us:
            out[evt.key] = round(us / (replays * n_calls), 2)
    return out


def bench_decode(name: str, k: int, n: int, t: int, rank: int, slots: int, dtype, device, small: bool,
                 profile_kernels: bool = False) -> dict:
    from gpt2serve.engine.layers.basic import LayerNorm
    from gpt2serve.engine.layers.linear import Linear

    has_ln, act, has_res = DECODE_FUSION[name]
    if device.type == "cuda":  # as DecodeGraphs does before capturing: split-K and the LoRA producers need it
        from gpt2serve.kernels.decode_linear import reserve_scratch

        reserve_scratch(device)
    gen = torch.Generator(device=device).manual_seed(t * 31 + n)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale + offset).to(dtype)

    elt = torch.tensor([], dtype=dtype).element_size()
    layers = []
    for _ in range(copies_for(n * k * elt, small)):
        layer = Linear(k, n).to(device)
        layer.weight.data = rnd(n, k, scale=k ** -0.5)
        layer.bias.data = rnd(n, scale=0.1)
        layer.lora_a = rnd(slots, rank, k, scale=k ** -0.5)
        layer.lora_b = rnd(slots, n, rank, scale=rank ** -0.5)
        layer.lora_targeted = True
        layers.append(layer)
    norm = LayerNorm(k, 1e-5).to(device=device, dtype=dtype)
    norm.weight.data, norm.bias.data = rnd(k, scale=0.2, offset=1.0), rnd(k, scale=0.1)
    x, res = rnd(t, k, scale=2.0, offset=0.3), rnd(t, n)
    ids = torch.randint(0, slots, (t,), generator=gen, device=device, dtype=torch.int32)

    def call(i, slot_ids):
        return layers[i % len(layers)](x, norm=norm if has_ln else None, activation=act,
                                       residual=res if has_res else None, lora_slots=slot_ids)

    graph_kw = dict(n_calls=2, replays=1) if small else dict(n_calls=100, replays=10)
    calls = range(len(layers))
    rec = dict(layer=name, K=k, N=n, T=t)
    l0 = layers[0]
    h = F.layer_norm(x.float(), (k,), norm.weight.float(), norm.bias.float(), norm.eps) if has_ln else x.float()
    ref = F.linear(h, l0.weight.float(), l0.bias.float()) + lora.lora_delta_ref(h, l0.lora_a, l0.lora_b, ids)
    ref = F.gelu(ref, approximate="tanh") if act else ref
    ref = ref + res.float() if has_res else ref
    rec["rel_err"] = rel_err(_graph_output(lambda: call(0, ids)), ref) if device.type == "cuda" else 0.0
    rec["ok"] = rec["rel_err"] <= TOL[dtype]
    rec["plain_us"] = time_graph([lambda i=i: call(i, None) for i in calls], **graph_kw)
    rec["fused_lora_us"] = time_graph([lambda i=i: call(i, ids) for i in calls], **graph_kw)
    def two_launches(i):  # the shrink as a kernel of its own, the fused linear's epilogue adding its result
        from gpt2serve.kernels.decode_linear import LoraDelta, fused_linear

        layer = layers[i % len(layers)]
        ln = dict(ln_weight=norm.weight, ln_bias=norm.bias) if has_ln else {}
        h_parts = lora.lora_shrink_partials(x, layer.lora_a, ids, **ln)
        delta = LoraDelta(layer.lora_b, ids, h_parts=h_parts, ln_eps=norm.eps if has_ln else None)
        return fused_linear(x, layer.weight, layer.bias, **ln, ln_eps=norm.eps, activation=act,
                            residual=res if has_res else None, lora=delta)

    rec["two_launch_lora_us"] = time_graph([lambda i=i: two_launches(i) for i in calls], **graph_kw)
    if profile_kernels and device.type == "cuda":
        rec["kernels_us"] = {"plain": kernel_us([lambda i=i: call(i, None) for i in calls]),
                             "fused_lora": kernel_us([lambda i=i: call(i, ids) for i in calls]),
                             "two_launch_lora": kernel_us([lambda i=i: two_launches(i) for i in calls])}
    for layer in layers:  # the earlier path: LoRA outside the fused kernel
        layer._fuses_lora = lambda x: False
    rec["unfused_lora_us"] = time_graph([lambda i=i: call(i, ids) for i in calls], **graph_kw)
    rec["overhead_us"] = rec["fused_lora_us"] - rec["plain_us"]
    return rec


# Launch configurations tried for the one-row LoRA layers (``--section lora-configs``), over each shape's plain
# winner; None is the table's own entry.
LORA_CONFIG_CANDIDATES = [None] + [dict(block_n=bn, block_k=bk, num_warps=4, prefetch=True)
                                   for bn, bk in ((16, 256), (8, 256), (16, 512), (32, 128), (8, 512), (4, 512))]


def run_lora_configs(args, dtype, device, report, dump) -> bool:
    """Time every candidate for each decode layer at one row, plain and with an in-kernel LoRA shrink; print the
    ``TUNED_LORA_CONFIGS`` entries that beat the table's current one."""
    from gpt2serve.kernels import decode_linear as dl

    all_ok, rows = True, []
    for name, (k, n) in layer_shapes(args.small).items():
        key = (k, n, 1)
        current = dl.TUNED_LORA_CONFIGS.get(key) or dl.TUNED_CONFIGS.get(key) or dl.FMA_CONFIG
        for candidate in LORA_CONFIG_CANDIDATES:
            saved = dict(dl.TUNED_LORA_CONFIGS)
            dl.TUNED_LORA_CONFIGS[key] = {**current, **(candidate or {})}
            try:
                rec = bench_decode(name, k, n, 1, args.rank, args.slots, dtype, device, args.small)
            finally:
                dl.TUNED_LORA_CONFIGS.clear()
                dl.TUNED_LORA_CONFIGS.update(saved)
            rec["candidate"] = candidate
            all_ok &= rec["ok"]
            rows.append(rec)
            report["lora_config_rows"] = rows
            dump()
            print(f"  {name:12} {candidate or 'current'}: plain {rec['plain_us']:.2f} us, fused LoRA "
                  f"{rec['fused_lora_us']:.2f} us", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\nTUNED_LORA_CONFIGS winners (fused LoRA us per call at one row):")
    for name, (k, n) in layer_shapes(args.small).items():
        mine = [r for r in rows if r["layer"] == name]
        best = min(mine, key=lambda r: r["fused_lora_us"])
        print(f"  {(k, n, 1)}: {best['candidate'] or 'current'}  {best['fused_lora_us']:.2f} us "
              f"(current {mine[0]['fused_lora_us']:.2f})")
    return all_ok


def run_decode(args, dtype, device, report, dump) -> bool:
    all_ok = True
    rows = []
    for name, (k, n) in layer_shapes(args.small).items():
        for t in (1, 4, 8):
            rec = bench_decode(name, k, n, t, args.rank, args.slots, dtype, device, args.small,
                               profile_kernels=args.profile and t in (1, 4))
            all_ok &= rec["ok"]
            rows.append(rec)
            report["decode_rows"] = rows
            dump()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n| layer | T | plain us | fused lora us | overhead us | two-launch lora us | unfused lora us | rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['T']} | {r['plain_us']:.2f} | {r['fused_lora_us']:.2f} | {r['overhead_us']:.2f} "
              f"| {r['two_launch_lora_us']:.2f} | {r['unfused_lora_us']:.2f} "
              f"| {r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    print("(decode layers as the engine's graphs run them; us per call, CUDA-graph replay median)")
    for r in rows:
        for variant, kernels in r.get("kernels_us", {}).items():
            listed = ", ".join(f"{k[:40]} {v}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
            print(f"  kernels {r['layer']} T={r['T']} {variant}: {listed} (sum {sum(kernels.values()):.2f} us)")
    return all_ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4, help="resident adapters (the stacks' S)")
    ap.add_argument("--ts", default="1,8,32,256,2048", help="comma-separated token-row counts T")
    ap.add_argument("--no-adapter-frac", type=float, default=0.0, help="fraction of rows with slot -1")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test under the interpreter)")
    ap.add_argument("--section", default="all", choices=["all", "apply", "decode", "lora-configs"],
                    help="apply: apply_lora per layer (1, 2); decode: the fused decode layers (3); lora-configs: "
                         "(4)")
    ap.add_argument("--profile", action="store_true",
                    help="decode: also each variant's GPU time per kernel (torch.profiler), at T = 1 and 4")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        print("no GPU: use --small for a smoke test under the Triton interpreter")
        return 2
    dtype = getattr(torch, args.dtype)
    ts = [int(v) for v in args.ts.split(",")]
    if args.small:
        ts = [t for t in ts if t <= 32] or [1]
    t0 = time.perf_counter()
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, triton=triton.__version__, dtype=args.dtype, rank=args.rank,
                  slots=args.slots, no_adapter_frac=args.no_adapter_frac, masked_max_rows=lora.MASKED_MAX_ROWS,
                  shrink_defaults=lora.SHRINK_CONFIG, expand_defaults=lora.EXPAND_CONFIG,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[])

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)

    print(f"== {report['device']}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
          f"rank {args.rank}, {args.slots} slots")
    all_ok = True
    if args.section == "lora-configs":
        all_ok = run_lora_configs(args, dtype, device, report, dump)
        dump()
        return 0 if all_ok else 1
    if args.section in ("all", "decode"):
        all_ok &= run_decode(args, dtype, device, report, dump)
        if args.section == "decode":
            dump()
            print(f"correctness: {'all ok' if all_ok else 'FAILURES'}; total {time.perf_counter() - t0:.0f} s")
            return 0 if all_ok else 1
    for name, (k, n) in layer_shapes(args.small).items():
        for t in ts:
            case = Case(k, n, t, args.rank, args.slots, args.no_adapter_frac, dtype, device, args.small, seed=t)
            rec = dict(layer=name, K=k, N=n, T=t, **check(case, dtype))
            all_ok &= rec["ok"]
            rec.update(bench_case(case, args.rank, args.slots, args.small))
            report["rows"].append(rec)
            dump()
            print(f"  {'ok  ' if rec['ok'] else 'FAIL'} {name:12} T={t:5d} rel_err {rec['rel_err']:.2e} "
                  f"base {rec['base_us']:8.2f} us  lora {rec['lora_us']:8.2f} us  ({time.perf_counter() - t0:.0f} s)")
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    print()
    print("| layer | K | N | T | path | base us | lora us | lora/base | shrink us | expand us | segments us "
          "| masked us | sorted us | rel err |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        print(f"| {r['layer']} | {r['K']} | {r['N']} | {r['T']} | {r['path']} | {f(r['base_us'])} "
              f"| {f(r['lora_us'])} | {f(r['ratio'])} | {f(r['shrink_us'])} | {f(r['expand_us'])} "
              f"| {f(r['segments_us'])} | {f(r.get('masked_us'))} | {f(r.get('sorted_us'))} "
              f"| {r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    print(f"\n(us per call, CUDA-graph replay median; base = fp16 F.linear of the same shape; lora = apply_lora with "
          f"precomputed segments; segments = lora_segments, once per step)")
    print(f"correctness: {'all ok' if all_ok else 'FAILURES'}; total {time.perf_counter() - t0:.0f} s")
    dump()
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
