#!/usr/bin/env python
"""Correctness check and benchmark of the Triton kernels at GPT-2 XL shapes (H=25, D=64, block_size=16).

    python benchmarks/kernels_gpu.py [--out results.json] [--no-sweep] [--small]

Needs only torch + triton (it imports kernels/*, never engine/). On a GPU it:
  1. checks every kernel in fp16 and bf16 against the fp32 PyTorch reference on random data, with outputs
     pre-filled with NaN and every pool slot outside the live contexts set to NaN (max abs error per case);
  2. times them with triton.testing.do_bench (median): decode at batch 256 x ctx 512 (K/V bytes per second and
     the fraction of 3.0 TB/s), batch 1 x ctx 1024 with and without split-K, 512-token prefill chunks, write_kv,
     and the fused kernels against unfused PyTorch; cascade attention against the ordinary decode kernel on 512
     sequences behind one shared 512-token prefix (and 4 groups of 128, each behind its own), 64..192 own
     tokens each (GB/s there counts the bytes that must be read: each prefix once, plus every suffix);
  3. unless --no-sweep, sweeps the decode/prefill/cascade tile configs and split counts and reports the best.
It prints a table and, with --out, writes everything as JSON. Exit status 1 if any correctness check fails.
--small shrinks every shape so the script can be smoke-tested on a CPU under TRITON_INTERPRET=1 (there, bf16
prefill and cascade attention fail: the interpreter's bf16 tl.dot is broken and it truncates when casting to bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from gpt2serve.kernels import cascade_attention as ca  # noqa: E402
from gpt2serve.kernels import paged_attention as pa  # noqa: E402
from gpt2serve.kernels.attention_ref import paged_attention_ref, write_kv_ref  # noqa: E402
from gpt2serve.kernels.fused import add_layernorm, add_layernorm_ref, bias_gelu, bias_gelu_ref  # noqa: E402
from gpt2serve.kernels.kv_write import write_kv  # noqa: E402

PEAK_BYTES_PER_S = 3.0e12  # H100 SXM HBM3, nominal
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


class Shapes:
    def __init__(self, small: bool):
        self.heads, self.head_dim, self.block_size = (2, 64, 16) if small else (25, 64, 16)
        self.hidden = self.heads * self.head_dim if small else 1600
        self.mlp = 4 * self.hidden
        self.decode_batch, self.decode_ctx = (4, 64) if small else (256, 512)
        self.long_ctx = 160 if small else 1024
        self.chunk, self.chunk_ctx = (32, 96) if small else (512, 2048)
        self.rows = (8, 16) if small else (256, 2048)  # fused kernels: decode-sized and prefill-sized batches
        # Cascade: sequences, shared prefix tokens, own tokens (uniform in [lo, hi]), and group counts to try.
        self.shared_seqs, self.shared_prefix, self.own = (16, 64, (8, 24)) if small else (512, 512, (64, 192))
        self.shared_groups = (1, 2) if small else (1, 4)


def make_batch(q_lens, ctx_lens, shapes, dtype, device, seed=0):
    """Paged batch over a shuffled pool; ``poisoned`` is the pool with every slot outside the contexts NaN."""
    gen = torch.Generator(device=device).manual_seed(seed)
    heads, dim, bs = shapes.heads, shapes.head_dim, shapes.block_size
    blocks_per_seq = [triton.cdiv(c, bs) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 1
    perm = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    junk = perm[-1]  # every unused block-table entry points at this block, NaN in the poisoned pool
    block_tables = junk.repeat(len(ctx_lens), max(blocks_per_seq) + 1)
    valid = torch.zeros(num_blocks * bs, dtype=torch.bool, device=device)
    start = 0
    for b, (n, ctx) in enumerate(zip(blocks_per_seq, ctx_lens)):
        block_tables[b, :n] = perm[start:start + n]
        start += n
        pos = torch.arange(ctx, device=device)
        valid[block_tables[b, pos // bs].long() * bs + pos % bs] = True
    pool = torch.randn(2, num_blocks, bs, heads, dim, device=device, generator=gen).to(dtype)
    poisoned = pool.clone()
    poisoned.view(2, -1, heads, dim)[:, ~valid] = float("nan")
    q = torch.randn(sum(q_lens), heads, dim, device=device, generator=gen).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return dict(q=q, pool=pool, poisoned=poisoned, block_tables=block_tables, seq_lens=seq_lens,
                query_start_loc=qsl, max_query_len=max(q_lens), max_seq_len=max(ctx_lens),
                q_lens=list(q_lens), ctx_lens=list(ctx_lens))


def make_shared_batch(num_groups, shapes, dtype, device, seed=0):
    """A decode batch of ``shapes.shared_seqs`` sequences in ``num_groups`` equal groups, each group behind its own
    ``shapes.shared_prefix``-token prefix (the same pool blocks in every member's table), each sequence with its own
    tokens after it. Rows alternate between groups, as a running batch would mix them. Holds the ordinary batch's
    fields (full tables, NaN-poisoned pool) and, under ``cascade``, the cascade kernel's arguments."""
    gen = torch.Generator(device=device).manual_seed(seed)
    heads, dim, bs = shapes.heads, shapes.head_dim, shapes.block_size
    n, prefix_blocks = shapes.shared_seqs, shapes.shared_prefix // bs
    assert n % num_groups == 0 and shapes.shared_prefix % bs == 0
    own = torch.randint(shapes.own[0], shapes.own[1] + 1, (n,), generator=gen, device=device).tolist()
    own_blocks = [triton.cdiv(o, bs) for o in own]
    num_blocks = num_groups * prefix_blocks + sum(own_blocks) + 1
    perm = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    junk = perm[-1]
    prefixes = perm[:num_groups * prefix_blocks].view(num_groups, prefix_blocks)
    group_of = torch.arange(n, device=device) % num_groups
    width = prefix_blocks + max(own_blocks) + 1
    block_tables = junk.repeat(n, width)
    suffix_tables = junk.repeat(n, max(own_blocks))
    valid = torch.zeros(num_blocks * bs, dtype=torch.bool, device=device)
    start = num_groups * prefix_blocks
    ctx_lens = []
    for b in range(n):
        mine = perm[start:start + own_blocks[b]]
        start += own_blocks[b]
        block_tables[b, :prefix_blocks] = prefixes[group_of[b]]
        block_tables[b, prefix_blocks:prefix_blocks + len(mine)] = mine
        suffix_tables[b, :len(mine)] = mine
        ctx_lens.append(shapes.shared_prefix + own[b])
        pos = torch.arange(ctx_lens[-1], device=device)
        valid[block_tables[b, pos // bs].long() * bs + pos % bs] = True
    pool = torch.randn(2, num_blocks, bs, heads, dim, device=device, generator=gen).to(dtype)
    poisoned = pool.clone()
    poisoned.view(2, -1, heads, dim)[:, ~valid] = float("nan")
    q = torch.randn(n, heads, dim, device=device, generator=gen).to(dtype)
    i32 = dict(dtype=torch.int32, device=device)
    cascade = dict(
        prefix_tables=prefixes, prefix_lens=torch.full((num_groups,), shapes.shared_prefix, **i32),
        group_query_start=torch.arange(num_groups + 1, **i32) * (n // num_groups),
        group_rows=torch.argsort(group_of, stable=True).to(torch.int32),
        suffix_tables=suffix_tables, suffix_lens=torch.tensor(own, **i32),
        max_group_size=n // num_groups, max_prefix_len=shapes.shared_prefix, max_suffix_len=max(own),
    )
    return dict(q=q, pool=pool, poisoned=poisoned, block_tables=block_tables,
                seq_lens=torch.tensor(ctx_lens, **i32), query_start_loc=torch.arange(n + 1, **i32),
                max_query_len=1, max_seq_len=max(ctx_lens), q_lens=[1] * n, ctx_lens=ctx_lens, cascade=cascade,
                unique_tokens=num_groups * shapes.shared_prefix + sum(own))


def run_cascade(batch, out=None, num_splits=None, prefix_splits=None):
    c = batch["cascade"]
    return ca.cascade_attention(
        batch["q"], batch["poisoned"], batch["query_start_loc"], c["prefix_tables"], c["prefix_lens"],
        c["group_query_start"], c["group_rows"], c["suffix_tables"], c["suffix_lens"], c["max_group_size"],
        c["max_prefix_len"], c["max_suffix_len"], batch["q"].shape[-1] ** -0.5, out=out, num_splits=num_splits,
        prefix_splits=prefix_splits,
    )


def unique_kv_bytes(batch):
    """K and V bytes a shared-prefix batch must read: each group's prefix once, plus every sequence's suffix."""
    h, d = batch["q"].shape[1:]
    return batch["unique_tokens"] * h * d * 2 * batch["pool"].element_size()


def attn_args(batch):
    return (batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], batch["max_query_len"],
            batch["max_seq_len"], batch["q"].shape[-1] ** -0.5)


def run_attn(batch, num_splits=None, out=None):
    return pa.paged_attention(batch["q"], batch["poisoned"], *attn_args(batch), out=out, num_splits=num_splits)


def ref_attn(batch):
    return paged_attention_ref(batch["q"].float(), batch["pool"].float(), *attn_args(batch))


def kv_bytes(batch):
    """K and V bytes the attention must read: every (token, head) of every context, once."""
    h, d = batch["q"].shape[1:]
    return sum(batch["ctx_lens"]) * h * d * 2 * batch["pool"].element_size()


def attn_flops(batch):
    """Useful causal FLOPs (QK^T + PV): 4 * D per (query, visible key, head)."""
    h, d = batch["q"].shape[1:]
    keys = sum(sum(c - q + i + 1 for i in range(q)) for q, c in zip(batch["q_lens"], batch["ctx_lens"]))
    return 4 * d * h * keys


def bench_ms(fn) -> float:
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # CPU smoke test: one interpreted run, timing meaningless
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_graph_ms(fn) -> float | None:
    """Median time inside a CUDA graph: no Python/launch overhead (which dominates kernels of a few us), but
    also no L2 flush between replays, so small working sets are read from L2."""
    if not torch.cuda.is_available():
        return None
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as exc:  # not capturable (e.g. a host sync inside fn)
        print(f"    (cuda graph timing unavailable: {type(exc).__name__}: {str(exc)[:80]})", flush=True)
        return None


def max_err(got, ref):
    return float((got.float() - ref.float()).abs().max())


class Report:
    def __init__(self):
        self.correctness, self.timings, self.sweeps = [], [], {}

    def check(self, case, dtype, got, ref, tol):
        """Pass when |got - ref| <= tol * (1 + |ref|) everywhere (tol = 0: bit-exact) and nothing is NaN."""
        nan = bool(torch.isnan(got).any())
        err = float("nan") if nan else max_err(got, ref)
        ok = (not nan) and bool(((got.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all())
        self.correctness.append(dict(case=case, dtype=str(dtype).replace("torch.", ""), max_abs_err=err,
                                     tol=tol, ok=ok))
        print(f"  [{'ok' if ok else 'FAIL'}] {case:<34} {str(dtype):<15} max_abs_err={err:.3e} (tol {tol:g})",
              flush=True)

    def time(self, name, fn, nbytes=None, flops=None, baseline=None, note=""):
        """Time ``fn`` (and ``baseline``, the PyTorch equivalent, if given) and record the row."""
        ms = bench_ms(fn)
        graph_ms = bench_graph_ms(fn)
        baseline_ms = bench_ms(baseline) if baseline is not None else None
        row = dict(name=name, median_us=ms * 1e3, note=note)
        if graph_ms is not None:
            row["graph_us"] = graph_ms * 1e3
        if nbytes is not None:
            row["gbytes_per_s"] = nbytes / (ms * 1e-3) / 1e9
            row["frac_of_3TBps"] = nbytes / (ms * 1e-3) / PEAK_BYTES_PER_S
        if flops is not None:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
        if baseline_ms is not None:
            row["torch_us"] = baseline_ms * 1e3
            row["speedup"] = baseline_ms / ms
        self.timings.append(row)
        print(f"  {name:<40} {ms * 1e3:10.1f} us  {_metrics(row)}", flush=True)


def _metrics(row):
    parts = []
    if "graph_us" in row:
        parts.append(f"graph {row['graph_us']:8.1f} us")
    if "gbytes_per_s" in row:
        parts.append(f"{row['gbytes_per_s']:8.1f} GB/s ({100 * row['frac_of_3TBps']:5.1f}% of 3.0 TB/s)")
    if "tflops" in row:
        parts.append(f"{row['tflops']:7.1f} TFLOP/s")
    if "speedup" in row:
        parts.append(f"torch {row['torch_us']:.1f} us, x{row['speedup']:.2f} (do_bench vs do_bench)")
    if row.get("note"):
        parts.append(row["note"])
    return "  ".join(parts)


def attention_cases(s: Shapes):
    """(name, q_lens, ctx_lens, num_splits) covering decode, split-K, prefill chunks and mixed steps."""
    gen = torch.Generator().manual_seed(0)
    ragged = torch.randint(1, 4 * s.decode_ctx, (max(s.decode_batch // 4, 2),), generator=gen).tolist()
    return [
        (f"decode b{s.decode_batch} ctx{s.decode_ctx}", [1] * s.decode_batch, [s.decode_ctx] * s.decode_batch, None),
        (f"decode b1 ctx{s.long_ctx} split=auto", [1], [s.long_ctx], None),
        (f"decode b1 ctx{s.long_ctx} split=1", [1], [s.long_ctx], 1),
        ("decode b2 ragged split=3", [1, 1], [s.long_ctx, s.long_ctx // 3 + 1], 3),
        (f"decode b{len(ragged)} ragged ctx", [1] * len(ragged), ragged, None),
        (f"prefill {s.chunk} fresh", [s.chunk], [s.chunk], None),
        (f"prefill {s.chunk} on ctx{s.chunk_ctx - s.chunk}", [s.chunk], [s.chunk_ctx], None),
        (f"mixed {s.chunk}+{s.chunk // 2}+decodes", [s.chunk, s.chunk // 2] + [1] * 30,
         [s.chunk_ctx, s.chunk // 2] + ragged[:1] * 30, None),
    ]


def check_correctness(rep: Report, s: Shapes, device):
    print("correctness vs fp32 reference (poisoned outputs and pools):", flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        tol = TOLERANCE[dtype]
        for i, (name, q_lens, ctx_lens, splits) in enumerate(attention_cases(s)):
            batch = make_batch(q_lens, ctx_lens, s, dtype, device, seed=i)
            out = torch.full_like(batch["q"], float("nan"))
            got = run_attn(batch, num_splits=splits, out=out)
            rep.check(f"attention: {name}", dtype, got, ref_attn(batch), tol)
            del batch, out, got

        for groups in s.shared_groups:
            batch = make_shared_batch(groups, s, dtype, device, seed=groups)
            out = torch.full_like(batch["q"], float("nan"))
            rep.check(f"cascade: {groups} group(s) of {s.shared_seqs // groups}", dtype, run_cascade(batch, out=out),
                      ref_attn(batch), tol)
            del batch, out

        batch = make_batch([s.chunk, 1], [s.chunk + 40, 77], s, dtype, device, seed=99)
        t = batch["q"].shape[0] + 5
        bt = batch["block_tables"].long()
        slots = []
        for b, (q_len, ctx) in enumerate(zip(batch["q_lens"], batch["ctx_lens"])):
            pos = torch.arange(ctx - q_len, ctx, device=device)
            slots.append(bt[b, pos // s.block_size] * s.block_size + pos % s.block_size)
        slots.append(torch.full((5,), -1, dtype=torch.long, device=device))
        slot_mapping = torch.cat(slots)
        k = torch.randn(t, s.heads, s.head_dim, device=device).to(dtype)
        v = torch.randn_like(k)
        expected = batch["pool"].clone()
        write_kv_ref(k, v, expected, slot_mapping)
        write_kv(k, v, batch["pool"], slot_mapping)
        rep.check("write_kv (5 padding slots)", dtype, batch["pool"], expected, 0.0)
        del batch, expected

        rows = s.rows[1]
        x, r = (torch.randn(rows, s.hidden, device=device).to(dtype) for _ in range(2))
        w, b = (torch.randn(s.hidden, device=device).to(dtype) for _ in range(2))
        normed, new_res = add_layernorm(x, r, w, b, 1e-5)
        ref_normed, ref_res = add_layernorm_ref(x, r, w, b, 1e-5)
        rep.check(f"add_layernorm [{rows},{s.hidden}]", dtype, normed, ref_normed, 2 * tol)
        rep.check(f"add_layernorm residual [{rows},{s.hidden}]", dtype, new_res, ref_res, 0.0)
        rep.check("layernorm (no residual)", dtype, add_layernorm(x, None, w, b, 1e-5)[0],
                  add_layernorm_ref(x, None, w, b, 1e-5)[0], 2 * tol)
        h, fb = torch.randn(rows, s.mlp, device=device).to(dtype) * 3, torch.randn(s.mlp, device=device).to(dtype)
        rep.check(f"bias_gelu [{rows},{s.mlp}]", dtype, bias_gelu(h, fb), bias_gelu_ref(h, fb), 2 * tol)


def run_timings(rep: Report, s: Shapes, device):
    dtype = torch.float16
    print(f"timings ({dtype}, H={s.heads}, D={s.head_dim}, block_size={s.block_size}; median of do_bench with L2 "
          "flushed, and of a CUDA-graph replay):", flush=True)
    dec = make_batch([1] * s.decode_batch, [s.decode_ctx] * s.decode_batch, s, dtype, device)
    out = torch.empty_like(dec["q"])
    splits = pa.default_num_splits(s.decode_batch, s.heads, 1, s.decode_ctx, dec["q"].device)
    rep.time(f"decode b{s.decode_batch} x ctx{s.decode_ctx}", lambda: run_attn(dec, out=out),
             nbytes=kv_bytes(dec), note=f"splits={splits}")
    del dec, out
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    one = make_batch([1], [s.long_ctx], s, dtype, device)
    auto = pa.default_num_splits(1, s.heads, 1, s.long_ctx, one["q"].device)
    for splits, label in ((1, "split=1"), (None, f"split=auto({auto})")):
        rep.time(f"decode b1 x ctx{s.long_ctx} {label}", lambda: run_attn(one, num_splits=splits),
                 nbytes=kv_bytes(one))

    for groups in s.shared_groups:
        sb = make_shared_batch(groups, s, dtype, device, seed=groups)
        label = f"{s.shared_seqs} seqs in {groups} group(s), prefix {s.shared_prefix} + own {s.own[0]}..{s.own[1]}"
        out = torch.empty_like(sb["q"])
        # The ordinary kernel reads every context in full (mostly from L2 for the prefix); both rows count only
        # the bytes that must be read, so their GB/s compare like their times.
        rep.time(f"ordinary decode: {label}", lambda: run_attn(sb, out=out), nbytes=unique_kv_bytes(sb),
                 note=f"must-read bytes; full contexts are x{kv_bytes(sb) / unique_kv_bytes(sb):.1f} that")
        ordinary = rep.timings[-1]
        rep.time(f"cascade decode: {label}", lambda: run_cascade(sb, out=out), nbytes=unique_kv_bytes(sb))
        row = rep.timings[-1]
        row["speedup_vs_ordinary"] = ordinary["median_us"] / row["median_us"]
        row["note"] = f"x{row['speedup_vs_ordinary']:.2f} vs ordinary"
        if "graph_us" in row and "graph_us" in ordinary:
            row["graph_speedup_vs_ordinary"] = ordinary["graph_us"] / row["graph_us"]
            row["note"] += f" (x{row['graph_speedup_vs_ordinary']:.2f} in graphs)"
        print(f"    {row['note']}", flush=True)
        del sb, out
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    for q_len, ctx in ((s.chunk, s.chunk), (s.chunk, s.chunk_ctx)):
        pre = make_batch([q_len], [ctx], s, dtype, device)
        rep.time(f"prefill {q_len} tokens, ctx {ctx}", lambda: run_attn(pre), flops=attn_flops(pre),
                 nbytes=kv_bytes(pre), note="bytes = context K/V once")

    pool = torch.randn(2, triton.cdiv(s.rows[1], s.block_size) + 1, s.block_size, s.heads, s.head_dim,
                       device=device).to(dtype)
    for t in s.rows:
        k, v = (torch.randn(t, s.heads, s.head_dim, device=device).to(dtype) for _ in range(2))
        slots = torch.randperm(t, device=device)
        rep.time(f"write_kv T={t}", lambda: write_kv(k, v, pool, slots), nbytes=4 * k.numel() * k.element_size(),
                 baseline=lambda: write_kv_ref(k, v, pool, slots), note="bytes = read + write")

    for rows in s.rows:
        x, r = (torch.randn(rows, s.hidden, device=device).to(dtype) for _ in range(2))
        w, b = (torch.randn(s.hidden, device=device).to(dtype) for _ in range(2))

        def unfused():
            h = x + r
            return F.layer_norm(h, (s.hidden,), w, b, 1e-5), h

        rep.time(f"add_layernorm [{rows},{s.hidden}]", lambda: add_layernorm(x, r, w, b, 1e-5),
                 nbytes=4 * x.numel() * x.element_size(), baseline=unfused, note="vs torch add + F.layer_norm")
        h, fb = torch.randn(rows, s.mlp, device=device).to(dtype), torch.randn(s.mlp, device=device).to(dtype)
        rep.time(f"bias_gelu [{rows},{s.mlp}]", lambda: bias_gelu(h, fb), nbytes=2 * h.numel() * h.element_size(),
                 baseline=lambda: F.gelu(h + fb, approximate="tanh"), note="vs torch add + F.gelu(tanh)")


def _sweep(rep: Report, key, config: dict, variants, batch, metric, run=None):
    """Time ``batch`` under each variant of ``config`` (restored afterwards); variants that disagree with the
    reference are reported as wrong rather than timed."""
    run = run or (lambda: run_attn(batch))
    saved = dict(config)
    ref = ref_attn(batch)
    results = []
    try:
        for variant in variants:
            config.clear()
            config.update(saved, **variant)
            try:
                err = max_err(run(), ref)
                ok = err <= TOLERANCE[batch["q"].dtype]
                ms = bench_ms(run) if ok else float("nan")
            except Exception as exc:  # e.g. out of shared memory / registers for this tile shape
                ok, err, ms = False, float("nan"), float("nan")
                variant = dict(variant, error=f"{type(exc).__name__}: {str(exc)[:80]}")
            results.append(dict(variant, us=ms * 1e3, max_abs_err=err, ok=ok, **{metric[0]: metric[1](ms)}))
            print(f"    {key}: {variant} -> {ms * 1e3:.1f} us ({metric[0]} {metric[1](ms):.2f})"
                  + ("" if ok else " WRONG/FAILED"), flush=True)
    finally:
        config.clear()
        config.update(saved)
    good = [r for r in results if r["ok"]]
    best = min(good, key=lambda r: r["us"]) if good else None
    rep.sweeps[key] = dict(default=saved, results=results, best=best)
    if best:
        print(f"  best {key}: {best}", flush=True)


def run_sweeps(rep: Report, s: Shapes, device):
    dtype = torch.float16
    print("sweeps (fp16):", flush=True)
    dec = make_batch([1] * s.decode_batch, [s.decode_ctx] * s.decode_batch, s, dtype, device)
    gbps = ("GB/s", lambda ms, n=kv_bytes(dec): n / (ms * 1e-3) / 1e9)
    variants = [dict(block_n=bn, num_warps=nw, num_stages=ns)
                for bn in (32, 64, 128) for nw in (2, 4, 8) for ns in (1, 2) if not (bn == 128 and nw == 2)]
    _sweep(rep, "decode_config", pa.DECODE_CONFIG, variants, dec, gbps)
    del dec

    one = make_batch([1], [s.long_ctx], s, dtype, device)
    gbps1 = ("GB/s", lambda ms, n=kv_bytes(one): n / (ms * 1e-3) / 1e9)
    results = []
    ref = ref_attn(one)
    for splits in (1, 2, 4, 8, 16, 32):
        err = max_err(run_attn(one, num_splits=splits), ref)
        ms = bench_ms(lambda: run_attn(one, num_splits=splits))
        results.append(dict(num_splits=splits, us=ms * 1e3, max_abs_err=err, gbps=gbps1[1](ms)))
        print(f"    num_splits b1 ctx{s.long_ctx}: {splits} -> {ms * 1e3:.1f} us ({gbps1[1](ms):.1f} GB/s)",
              flush=True)
    best = min(results, key=lambda r: r["us"])
    rep.sweeps[f"num_splits_b1_ctx{s.long_ctx}"] = dict(
        default=pa.default_num_splits(1, s.heads, 1, s.long_ctx, one["q"].device), results=results, best=best)
    print(f"  best num_splits: {best}", flush=True)

    sb = make_shared_batch(1, s, dtype, device)
    gbps_sb = ("GB/s", lambda ms, n=unique_kv_bytes(sb): n / (ms * 1e-3) / 1e9)
    variants = [dict(block_m_max=bm, block_n=bn, num_warps=nw, num_stages=ns)
                for bm, bn, nw in ((32, 64, 4), (64, 32, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (128, 32, 8))
                for ns in (2, 3)]
    _sweep(rep, "cascade_config", ca.CASCADE_CONFIG, variants, sb, gbps_sb, run=lambda: run_cascade(sb))
    results = []
    ref = ref_attn(sb)
    for prefix_splits in (1, 2, 4):
        err = max_err(run_cascade(sb, prefix_splits=prefix_splits), ref)
        ms = bench_ms(lambda: run_cascade(sb, prefix_splits=prefix_splits))
        results.append(dict(prefix_splits=prefix_splits, us=ms * 1e3, max_abs_err=err, gbps=gbps_sb[1](ms)))
        print(f"    cascade prefix_splits: {prefix_splits} -> {ms * 1e3:.1f} us ({gbps_sb[1](ms):.1f} GB/s)",
              flush=True)
    rep.sweeps["cascade_prefix_splits"] = dict(default="default_prefix_splits", results=results,
                                               best=min(results, key=lambda r: r["us"]))
    del sb

    pre = make_batch([s.chunk], [s.chunk_ctx], s, dtype, device)
    tflops = ("TFLOP/s", lambda ms, f=attn_flops(pre): f / (ms * 1e-3) / 1e12)
    variants = [dict(block_m_max=bm, block_n=bn, num_warps=nw, num_stages=ns)
                for bm, bn, nw in ((32, 64, 4), (64, 32, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (128, 32, 8))
                for ns in (2, 3)]
    _sweep(rep, "prefill_config", pa.PREFILL_CONFIG, variants, pre, tflops)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON to this path (default: stdout table only)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the config sweeps")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU/interpreter smoke test)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = Shapes(args.small or device.type == "cpu")
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (triton interpreter)",
               torch=torch.__version__, triton=triton.__version__, small=args.small or device.type == "cpu",
               heads=shapes.heads, head_dim=shapes.head_dim, block_size=shapes.block_size,
               decode_config=dict(pa.DECODE_CONFIG), prefill_config=dict(pa.PREFILL_CONFIG),
               cascade_config=dict(ca.CASCADE_CONFIG))
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}", flush=True)
    torch.manual_seed(0)
    rep = Report()
    check_correctness(rep, shapes, device)
    run_timings(rep, shapes, device)
    if not args.no_sweep:
        run_sweeps(rep, shapes, device)

    print("\n=== summary ===")
    failed = [c for c in rep.correctness if not c["ok"]]
    print(f"correctness: {len(rep.correctness) - len(failed)}/{len(rep.correctness)} ok"
          + "".join(f"\n  FAIL {c['case']} {c['dtype']} err={c['max_abs_err']:.3e}" for c in failed))
    print(f"{'kernel':<42}{'median us':>11}  metrics")
    for row in rep.timings:
        print(f"{row['name']:<42}{row['median_us']:11.1f}  {_metrics(row)}")
    for key, sweep in rep.sweeps.items():
        print(f"best {key}: {sweep['best']}  (default {sweep['default']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, correctness=rep.correctness, timings=rep.timings, sweeps=rep.sweeps), f,
                      indent=2, default=str)
        print(f"wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
