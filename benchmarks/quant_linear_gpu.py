#!/usr/bin/env python
"""Weight-only int8 / int4 linear kernels (kernels/quant_linear.py) vs fp16, at GPT-2 XL's four linear shapes.

    python benchmarks/quant_linear_gpu.py [--out quant_linear.json] [--epilogue model|bias] [--group-size 128]
                                          [--ms 1,4,8,16,64,512,2048] [--sweep] [--sweep-budget-s 120] [--small]

For each shape (c_attn 1600->4800, attn.c_proj 1600->1600, c_fc 1600->6400, mlp.c_proj 6400->1600) and each M it
times, in fp16 activations:
  * fp16   ``F.linear(x, W, bias)`` (cuBLAS; bias only, whatever --epilogue says)
  * fused  ``decode_linear.fused_linear`` (fp16 weights, M <= 16 only)
  * int8   ``int8_linear``  (per-channel scales)
  * int4   ``int4_linear``  (groups of --group-size)
With ``--epilogue model`` (default) the fused, int8 and int4 kernels run the epilogue the model fuses into that
layer (bias; + GELU on c_fc; + residual on the projections); ``--epilogue bias`` gives every variant bias only.
Timing: M <= 16 as in the engine's decode, 100 calls captured in one CUDA graph (cycling through enough weight
copies, ~200 MB, that they cannot sit in the 50 MB L2), CUDA-event timed, median of the replays; M > 16 with
``triton.testing.do_bench`` (warm-up, CUDA events, L2 flushed before every call, median). Both helpers come from
benchmarks/decode_linear_gpu.py.
Reported per row: us, GB/s of weight bytes (fp16: 2NK; int8: NK + scales; int4: NK/2 + scales + zeros), the
fraction of 3.35 TB/s (H100 SXM HBM3 peak), TFLOP/s (2MNK / time: what bounds prefill), and the max relative
error against the fp32 reference (dequantize, then matmul in fp32; fp16 / fused against the fp32 product with the
fp16 weights). Then the whole-model sum of the
M = 1 timings (48 layers x the four shapes) per variant, next to its weight-read floor at 3.35 TB/s.
``--sweep`` additionally tries decode tile configurations (M = 1 and M = 16, both widths) under a time budget and
prints ``TUNED_CONFIGS`` entries for kernels/quant_linear.py.
Prints a markdown table; ``--out`` writes everything as JSON. Exit status 1 if a kernel's relative error exceeds
1e-3 (int8 / int4; 1e-2 for fp16 and fused, whose reference rounds differently).
``--small`` shrinks the shapes so the script runs on a CPU under TRITON_INTERPRET=1 (a smoke test of the script;
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

from gpt2serve.benchmarks.decode_linear_gpu import L2_DEFEAT_BYTES, rel_err, time_do_bench, time_graph  # noqa: E402
from gpt2serve.kernels import decode_linear as dl  # noqa: E402
from gpt2serve.kernels import quant_linear as ql  # noqa: E402

HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3, datasheet
N_LAYERS = 48
MS = (1, 4, 8, 16, 64, 512, 2048)
GRAPH_MAX_M = 16  # timed inside a CUDA graph up to here (the decode regime)
TOL = {"int8": 1e-3, "int4": 1e-3, "fp16": 1e-2, "fused": 1e-2}
VARIANTS = ("fp16", "fused", "int8", "int4")


def layer_specs(small: bool) -> dict:
    h = 64 if small else 1600
    return {  # name: (K, N, epilogue the model fuses)
        "c_attn": (h, 3 * h, dict(gelu=False, res=False)),
        "attn.c_proj": (h, h, dict(gelu=False, res=True)),
        "c_fc": (h, 4 * h, dict(gelu=True, res=False)),
        "mlp.c_proj": (4 * h, h, dict(gelu=False, res=True)),
    }


def weight_bytes(variant: str, n: int, k: int, group_size: int, act_bytes: int = 2) -> int:
    if variant in ("fp16", "fused"):
        return n * k * act_bytes
    if variant == "int8":
        return n * k + n * act_bytes
    return n * k // 2 + 2 * n * math.ceil(k / group_size) * act_bytes


class Layer:
    """One shape's weights in every format (``copies`` distinct copies of each, to defeat L2) and its inputs."""

    def __init__(self, k, n, epi, group_size, dtype, device, copies, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape, scale=1.0, offset=0.0):
            return (torch.randn(*shape, generator=gen, device=device) * scale + offset).to(dtype)

        self.k, self.n, self.group_size, self.dtype, self.device = k, n, group_size, dtype, device
        self.epi = epi
        w = rnd(n, k, scale=k ** -0.5)
        q8, s8 = ql.quantize_int8(w)
        q4, s4, z4 = ql.quantize_int4(w, group_size)
        # Copies share values (quantizing once) but not memory, which is all the L2 sees.
        self.fp16 = [w] + [w.clone() for _ in range(copies - 1)]
        self.int8 = [(q8, s8)] + [(q8.clone(), s8.clone()) for _ in range(copies - 1)]
        self.int4 = [(q4, s4, z4)] + [(q4.clone(), s4.clone(), z4.clone()) for _ in range(copies - 1)]
        self.bias = rnd(n)
        self.rnd = rnd
        # fp32 references of the weights (dequantized exactly as the kernels see them).
        self.w_ref = {"fp16": w.float(), "fused": w.float(), "int8": ql.dequantize_int8(q8, s8),
                      "int4": ql.dequantize_int4(q4, s4, z4, group_size)}

    def inputs(self, m, epilogue):
        x = self.rnd(m, self.k, scale=2.0, offset=0.3)
        model = epilogue == "model"
        kw = dict(bias=self.bias, activation="gelu_tanh" if model and self.epi["gelu"] else None,
                  residual=self.rnd(m, self.n) if model and self.epi["res"] else None)
        out = torch.empty(m, self.n, dtype=self.dtype, device=self.device)
        return x, kw, out

    def call(self, variant, i, x, kw, out, config=None):
        """The variant's call on weight copy ``i``."""
        if variant == "fp16":
            return F.linear(x, self.fp16[i], self.bias)
        if variant == "fused":
            return dl.fused_linear(x, self.fp16[i], **kw, out=out)
        if variant == "int8":
            q, s = self.int8[i]
            return ql.int8_linear(x, q, s, **kw, out=out, config=config)
        q, s, z = self.int4[i]
        return ql.int4_linear(x, q, s, z, self.group_size, **kw, out=out, config=config)

    def reference(self, variant, x, kw):
        y = F.linear(x.float(), self.w_ref[variant], self.bias.float())
        if variant == "fp16":
            return y
        if kw["activation"] is not None:
            y = F.gelu(y, approximate="tanh")
        if kw["residual"] is not None:
            y = y + kw["residual"].float()
        return y


def copies_for(nbytes: int, small: bool) -> int:
    return 2 if small else max(2, math.ceil(L2_DEFEAT_BYTES / nbytes))


def time_variant(layer, variant, m, x, kw, out, copies, config=None, n_calls=100, replays=10) -> float:
    if m <= GRAPH_MAX_M:
        return time_graph([lambda i=i: layer.call(variant, i, x, kw, out, config) for i in range(copies)],
                          n_calls=n_calls, replays=replays)
    return time_do_bench(lambda: layer.call(variant, 0, x, kw, out, config))


def bandwidth(nbytes: int, us: float):
    if not us or us != us:
        return None, None
    gbs = nbytes / (us * 1e-6) / 1e9
    return round(gbs, 1), round(gbs * 1e9 / HBM_BYTES_PER_S, 3)


def bench(specs, ms, epilogue, group_size, dtype, device, small) -> list[dict]:
    rows = []
    for name, (k, n, epi) in specs.items():
        smallest = weight_bytes("int4", n, k, group_size)
        copies = copies_for(smallest, small)
        layer = Layer(k, n, epi, group_size, dtype, device, copies)
        for m in ms:
            x, kw, out = layer.inputs(m, epilogue)
            for variant in VARIANTS:
                if variant == "fused" and m > dl.MAX_M:
                    continue
                nbytes = weight_bytes(variant, n, k, group_size)
                # Copies enough for this format's bytes to exceed L2 (the int4 count is the largest).
                used = min(copies, copies_for(nbytes, small)) if m <= GRAPH_MAX_M else 1
                rec = dict(layer=name, K=k, N=n, M=m, variant=variant, weight_bytes=nbytes,
                           timing="graph" if m <= GRAPH_MAX_M else "do_bench")
                if variant in ("int8", "int4"):
                    rec["config"] = ql.resolve_config(8 if variant == "int8" else 4, m, n, k, device, group_size)
                y = layer.call(variant, 0, x, kw, out)
                err = rel_err(y, layer.reference(variant, x, kw)) if torch.isfinite(y).all() else float("inf")
                rec["rel_err"] = err
                rec["ok"] = err <= TOL[variant]
                rec["us"] = time_variant(layer, variant, m, x, kw, out, used)
                rec["gbs"], rec["frac"] = bandwidth(nbytes, rec["us"])
                rec["tflops"] = round(2 * m * n * k / (rec["us"] * 1e-6) / 1e12, 2) if rec["us"] else None
                rows.append(rec)
                print(f"  {name:12} M={m:5d} {variant:6} {rec['us']:9.2f} us {rec['gbs'] or 0:8.0f} GB/s "
                      f"({rec['frac'] or 0:.2f})  rel_err {err:.1e}{'' if rec['ok'] else '  FAIL'}", flush=True)
        del layer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def model_totals(rows, specs, group_size) -> dict:
    """48 x the four layers' M = 1 times, per variant, and the weight-read floor at HBM peak."""
    totals = {}
    for variant in VARIANTS:
        per_layer = [r["us"] for r in rows if r["M"] == 1 and r["variant"] == variant]
        if len(per_layer) != len(specs):
            continue
        nbytes = sum(weight_bytes(variant, n, k, group_size) for k, n, _ in specs.values())
        total_ms = N_LAYERS * sum(per_layer) / 1e3
        floor_ms = N_LAYERS * nbytes / HBM_BYTES_PER_S * 1e3
        totals[variant] = dict(ms=round(total_ms, 4), weight_bytes=N_LAYERS * nbytes, floor_ms=round(floor_ms, 4),
                               frac_of_floor=round(floor_ms / total_ms, 3) if total_ms else None)
    return totals


# ------------------------------------------------------------------------------------------------ sweep

SWEEP_TILES = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
               for bn, bk, nw, ns in [(64, 128, 4, 4), (32, 128, 4, 4), (128, 128, 4, 4), (128, 128, 8, 3),
                                      (64, 64, 4, 6), (32, 64, 4, 6), (64, 128, 4, 2), (64, 256, 4, 3)]]
SWEEP_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)


def sweep(specs, group_size, dtype, device, budget_s, small) -> tuple[list[dict], dict]:
    """Decode configs per (bits, layer, M in 1 / 16): tiles with the automatic split, then split count / mode /
    eviction hint around the best. Graph-timed; stops when the budget is spent."""
    t_end = time.perf_counter() + budget_s
    results, tuned = [], {}
    n_calls, replays = (2, 1) if small else (50, 5)
    for name, (k, n, epi) in specs.items():
        copies = copies_for(weight_bytes("int4", n, k, group_size), small)
        layer = Layer(k, n, epi, group_size, dtype, device, copies)
        for bits, variant in ((8, "int8"), (4, "int4")):
            used = min(copies, copies_for(weight_bytes(variant, n, k, group_size), small))
            for m in (1, 16):
                if time.perf_counter() > t_end:
                    print(f"sweep budget spent at {name} {variant} M={m}")
                    return results, tuned
                x, kw, out = layer.inputs(m, "model")

                def measure(cfg):
                    try:
                        return time_variant(layer, variant, m, x, kw, out, used, cfg, n_calls, replays)
                    except Exception as exc:  # e.g. out of shared memory: skip the config
                        print(f"  {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
                        return float("inf")

                default_us = measure(None)
                stage = []
                tiles = SWEEP_TILES[:2] if small else SWEEP_TILES
                for tile in tiles:
                    if time.perf_counter() > t_end:
                        break
                    if bits == 4 and group_size % tile["block_k"]:
                        continue  # would leave the folded path; the default already fits block_k to the group
                    cfg = {**tile, "split": "auto"}
                    stage.append((measure(cfg), cfg))
                if not stage:
                    continue
                _, base = min(stage, key=lambda t: t[0])
                variants = [{**base, "split": s} for s in SWEEP_SPLITS if s <= triton.cdiv(k, base["block_k"])]
                variants += [{**base, "split_mode": "two_pass"}, {**base, "w_evict": ""}]
                for cfg in variants:
                    if time.perf_counter() > t_end:
                        break
                    stage.append((measure(cfg), cfg))
                best_us, best = min(stage, key=lambda t: t[0])
                resolved = ql.resolve_config(bits, m, n, k, device, group_size, best)
                nbytes = weight_bytes(variant, n, k, group_size)
                results.append(dict(layer=name, variant=variant, M=m, default_us=default_us, best_us=best_us,
                                    best_gbs=bandwidth(nbytes, best_us)[0], config=resolved,
                                    tried=[dict(us=us, config=c) for us, c in stage]))
                keep = {key: resolved[key] for key in ("block_n", "block_k", "num_warps", "num_stages", "split",
                                                       "split_mode", "w_evict")}
                tuned[(bits, k, n, m)] = keep
                print(f"  sweep {name:12} {variant} M={m:2d}: default {default_us:7.2f} us, best {best_us:7.2f} us "
                      f"{keep}", flush=True)
        del layer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results, tuned


# ------------------------------------------------------------------------------------------------ main


def markdown(rows, totals) -> str:
    lines = ["| layer | K | N | M | variant | us | GB/s | frac of 3.35 TB/s | TFLOP/s | rel err |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['K']} | {r['N']} | {r['M']} | {r['variant']} | {r['us']:.2f} | "
                     f"{r['gbs'] or 0:.0f} | {r['frac'] or 0:.2f} | {r['tflops'] or 0:.1f} | "
                     f"{r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    lines += ["", f"Whole model at M = 1 ({N_LAYERS} layers x 4 linears):", "",
              "| variant | ms | weight GB | floor ms at 3.35 TB/s | fraction of floor |", "|---|---:|---:|---:|---:|"]
    for variant, t in totals.items():
        lines.append(f"| {variant} | {t['ms']:.3f} | {t['weight_bytes'] / 1e9:.2f} | {t['floor_ms']:.3f} | "
                     f"{t['frac_of_floor'] or 0:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--epilogue", default="model", choices=["model", "bias"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated row counts")
    ap.add_argument("--sweep", action="store_true", help="also sweep decode tile configs (prints TUNED_CONFIGS)")
    ap.add_argument("--sweep-budget-s", type=float, default=120.0)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test under the interpreter)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        print("no GPU: use --small for a smoke test under the Triton interpreter")
        return 2
    dtype = torch.float16
    if device.type == "cpu":
        dtype = torch.float32  # the interpreter's dot runs in fp32
    specs = layer_specs(args.small)
    ms = tuple(int(v) for v in args.ms.split(","))
    if args.small:
        ms = tuple(m for m in ms if m <= 64)
    t0 = time.perf_counter()
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, triton=triton.__version__, dtype=str(dtype).replace("torch.", ""),
                  epilogue=args.epilogue, group_size=args.group_size, hbm_bytes_per_s=HBM_BYTES_PER_S,
                  defaults=dict(decode=ql.DECODE_CONFIG, prefill_small=ql.PREFILL_SMALL_CONFIG,
                                prefill=ql.PREFILL_CONFIG, tuned={str(key): v for key, v in ql.TUNED_CONFIGS.items()}),
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)

    print(f"== kernels ({report['device']}, torch {torch.__version__}, triton {triton.__version__}, "
          f"epilogue {args.epilogue}, int4 groups of {args.group_size})")
    rows = bench(specs, ms, args.epilogue, args.group_size, dtype, device, args.small)
    report["kernels"] = rows
    report["model_m1"] = totals = model_totals(rows, specs, args.group_size)
    dump()
    print(f"   ({time.perf_counter() - t0:.0f} s)")

    if args.sweep:
        print(f"== sweep (budget {args.sweep_budget_s:.0f} s)")
        results, tuned = sweep(specs, args.group_size, dtype, device, args.sweep_budget_s, args.small)
        report["sweep"] = results
        report["suggested_tuned_configs"] = {str((b, k, n, 1 if m == 1 else 16)): cfg
                                             for (b, k, n, m), cfg in tuned.items()}
        dump()

    print()
    print(markdown(rows, totals))
    if report.get("suggested_tuned_configs"):
        print("\n# sweep winners -> TUNED_CONFIGS in kernels/quant_linear.py (key: (bits, K, N, m_bucket)):")
        for key, cfg in report["suggested_tuned_configs"].items():
            print(f"    {key}: {cfg},")
    all_ok = all(r["ok"] for r in rows)
    print(f"\ncorrectness: {'all ok' if all_ok else 'FAILURES'}; total {time.perf_counter() - t0:.0f} s")
    dump()
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
