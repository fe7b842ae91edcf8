"""Speculative decoding on the GPU (issue 8): GPT-2 XL verifying k = 4 proposals per step, against no speculation.

    python -m gpt2serve.benchmarks.spec_decode_gpu --out benchmarks/results/<date>_spec-decode_H100.json
    python -m gpt2serve.benchmarks.spec_decode_gpu --small --out /tmp/spec.json      # CPU, tiny checkpoints, seconds

W3-like requests (128-token prompt, 256 output tokens, greedy, EOS ignored) at batch 1, 8 and 32, each batch a
set of fresh prompts that all arrive at once. Reported per (proposer, batch): TPOT per emitted token, (finish -
first token) / (out - 1) from each request's metrics, median over requests and runs; acceptance rate and mean
tokens emitted per request per step. Proposers:

- ``no-spec``: no speculation, the baseline (its own engine). Its greedy outputs are recorded for the oracle.
- ``oracle``: proposes the next k tokens of the baseline's greedy output for the same prompt: 100 % acceptance,
  the most speculation can gain at this k.
- ``always-wrong``: the oracle's tokens + 1 (mod vocab): 0 % acceptance, the pure cost of verifying k tokens.
- ``draft``: the draft model (GPT-2 small), ``engine/spec_decode/draft_model.py``.

The oracle and always-wrong proposers live here (benchmark only) and are installed on an engine built with
``speculative: {method: ngram, num_speculative_tokens: k}`` by assigning ``engine.runner.proposer``. Prefix
caching is off, so that every mode computes the same prompts in full. Each (proposer, batch) first runs one
untimed batch of the same shape (Triton variants of the verification pass compile there); CUDA is synchronized
before each clock read. With dummy weights the acceptance of the draft says little about real checkpoints
(random GPT-2s mostly repeat their last token, so two of them agree far more often than trained ones); its cost
per step does not depend on the weights.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from gpt2serve.benchmarks.offline import device_name, git_commit, log, percentile, sync, warm_up_engine, write_results
from gpt2serve.engine.spec_decode.proposer import Proposal, ProposalRequest, Proposer

MODES = ("no-spec", "oracle", "always-wrong", "draft")
SPEC_KEYS = ("spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_steps")


class OracleProposer(Proposer):
    """Proposes the next tokens of a recorded greedy output of the request's prompt, shifted by ``shift`` (mod
    vocab): 0 gives the target's own tokens, 1 tokens it never picks. A request whose output has left the recorded
    one (fp16 rounding in another batch shape can flip a near-tie) gets nothing from then on, and is counted."""

    name = "oracle"

    def __init__(self, references: dict[tuple[int, ...], list[int]], vocab_size: int, shift: int = 0):
        self.references, self.vocab_size, self.shift = references, vocab_size, shift
        self._ref: dict[str, list[int] | None] = {}  # per request: its recorded output, None once diverged
        self.num_diverged = 0

    def propose(self, batch: list[ProposalRequest]) -> dict[str, Proposal]:
        out = {}
        for r in batch:
            if r.req_id not in self._ref:
                self._ref[r.req_id] = self.references.get(tuple(r.token_ids[:r.num_prompt_tokens]))
            ref = self._ref[r.req_id]
            done = len(r.token_ids) - r.num_prompt_tokens
            if ref is None or r.num_tokens <= 0 or done >= len(ref):
                continue
            if done and ref[done - 1] != r.token_ids[-1]:  # the last token is enough: earlier ones were checked
                self._ref[r.req_id] = None
                self.num_diverged += 1
                continue
            tokens = ref[done:done + r.num_tokens]
            out[r.req_id] = Proposal([(t + self.shift) % self.vocab_size for t in tokens] if self.shift else tokens)
        return out

    def drop(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._ref.pop(req_id, None)


def widen_greedy_margins(model, token: int = 1000, scale: float = 20.0) -> None:
    """Make a dummy-weight target's greedy choice unambiguous, so that the oracle's reference survives fp16.

    Random GPT-2 weights give nearly flat next-token distributions: the top two logits often differ by less than
    the rounding difference between a 1-token decode pass and a 5-token verify pass, so the target's own greedy
    output flips between the two shapes and the oracle loses track (the first run lost most requests this way).
    Adding ``scale`` times one token's unit embedding to the final LayerNorm's bias raises that token's logit by
    ``scale`` times its norm at every position: greedy then always picks it, in any shape. The work per token (the
    weights read, the attention over the same context lengths) does not depend on which tokens come out.
    """
    with torch.no_grad():
        row = model.wte.weight[token].float()
        model.ln_f.bias.add_((scale * row / row.norm()).to(model.ln_f.bias.dtype))


# ----------------------------------------------------------------------------------------------- measuring
def _params(n_out: int):
    from gpt2serve import SamplingParams

    return SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, detokenize=False)


def _spec_counters(llm) -> dict[str, float]:
    """The engine's cumulative speculation counters: SPEC_KEYS, and spec_proposed_at_<i> / spec_accepted_at_<i>
    (per proposal position)."""
    return {k: v for k, v in llm.engine.stats().items() if k.startswith("spec_")}


def _step_totals(llm) -> dict[str, float]:
    """Cumulative ms per step phase (schedule, prepare, forward launch, sample + propose, update) and steps."""
    timing = llm.engine.step_timing()
    steps = timing.get("steps", 0)
    return {"steps": steps, **{k: v * steps for k, v in timing.items() if k.endswith("_ms")}}


def run_batch(llm, prompts: list[list[int]], n_out: int, device: torch.device) -> dict[str, Any]:
    """One batch, all requests at t=0: per-request TTFT / TPOT, outputs, request-steps (from the scheduler's
    plans) and the engine's speculation counters over the batch."""
    engine = llm.engine
    request_steps = [0]

    def planned(sched) -> None:
        request_steps[0] += len(sched.num_scheduled_tokens)

    before, steps_before = _spec_counters(llm), _step_totals(llm)
    engine.schedule_observers.append(planned)
    try:
        sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=_params(n_out))
        sync(device)
        wall = time.perf_counter() - t0
    finally:
        engine.schedule_observers.remove(planned)
    after, steps_after = _spec_counters(llm), _step_totals(llm)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return {
        "wall_s": wall, "outputs": tokens, "request_steps": request_steps[0],
        "ttft_s": [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs],
        "tpot_s": [(o.metrics["finished_time"] - o.metrics["first_token_time"]) / (n_out - 1) for o in outs],
        "spec": {k: v - before.get(k, 0) for k, v in after.items()},
        "step_totals": {k: v - steps_before.get(k, 0) for k, v in steps_after.items()},
        "errors": sum(len(t) != n_out for t in tokens),
    }


def summarize(runs: list[dict[str, Any]], n_out: int, batch: int, prompt_len: int,
              budget: int) -> dict[str, Any]:
    """Figures over the timed runs of one (proposer, batch)."""
    tpot = [t for r in runs for t in r["tpot_s"]]
    ttft = [t for r in runs for t in r["ttft_s"]]
    n_req = batch * len(runs)
    # Every request's prompt is computed in one step (checked: the batch fits the token budget) and emits the
    # first token; each further step it is in emits 1 + its accepted proposals.
    decode_steps = sum(r["request_steps"] for r in runs) - n_req
    spec = {k: sum(r["spec"].get(k, 0) for r in runs) for k in sorted({k for r in runs for k in r["spec"]})}
    rec = {
        "num_requests": batch, "runs": len(runs), "errors": sum(r["errors"] for r in runs),
        "tpot_ms_p50": round(percentile(tpot, 50) * 1000, 4), "tpot_ms_p90": round(percentile(tpot, 90) * 1000, 4),
        "tpot_ms_runs": [round(statistics.median(r["tpot_s"]) * 1000, 4) for r in runs],
        "ttft_ms_p50": round(percentile(ttft, 50) * 1000, 3),
        "out_tok_s": round(batch * n_out / statistics.median(r["wall_s"] for r in runs), 1),
        "wall_s_runs": [round(r["wall_s"], 4) for r in runs],
        "mean_emitted_per_step": round((n_req * (n_out - 1)) / decode_steps, 4) if decode_steps > 0 else None,
        "engine_counters": spec,
    }
    steps = sum(r["step_totals"]["steps"] for r in runs)
    if steps:  # where a step's time goes (sample_ms includes the proposer's work, forward_ms only launches)
        rec["step_timing_ms"] = {"steps": steps, **{k: round(sum(r["step_totals"][k] for r in runs) / steps, 4)
                                                     for k in runs[0]["step_totals"] if k != "steps"}}
    if spec.get("spec_num_draft_tokens"):
        rec["acceptance_rate"] = round(spec["spec_num_accepted_tokens"] / spec["spec_num_draft_tokens"], 4)
    if spec.get("spec_num_steps"):  # verify steps, counted per request: each emits its accepted tokens + 1
        rec["mean_emitted_per_verify_step"] = round(1 + spec["spec_num_accepted_tokens"] / spec["spec_num_steps"], 4)
    positions = sorted(int(k.rsplit("_", 1)[1]) for k in spec if k.startswith("spec_proposed_at_"))
    if positions:
        rec["acceptance_by_position"] = [round(spec.get(f"spec_accepted_at_{i}", 0) / spec[f"spec_proposed_at_{i}"], 4)
                                         if spec[f"spec_proposed_at_{i}"] else None for i in positions]
    if batch * prompt_len > budget:
        rec.setdefault("notes", []).append("prompts span several steps: mean_emitted_per_step is approximate")
    return rec


# ----------------------------------------------------------------------------------------------- orchestration
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt2serve.benchmarks.spec_decode_gpu",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-xl")
    p.add_argument("--draft-model", default="gpt2")
    p.add_argument("--load-format", default="dummy", choices=["auto", "safetensors", "pt", "dummy"],
                   help="for the target and the draft alike")
    p.add_argument("--dtype", default="float16", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--runs", type=int, default=3, help="timed batches per (proposer, batch size), fresh prompts each")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}; no-spec is always "
                   "run when oracle or always-wrong is (they need its outputs)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine max_num_seqs (fewer graphs to capture)")
    p.add_argument("--draft-kv-cache-gib", type=float, default=2.0)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EngineConfig field (value parsed as YAML), repeatable")
    p.add_argument("--small", action="store_true",
                   help="CPU smoke run: tiny target and draft checkpoints built in a temporary directory, fp32, "
                        "16-token prompts, 24 output tokens, batches 1,2,4, one run")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON file; the markdown table goes beside it (.md)")
    return p


def _small_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny checkpoints sharing one vocabulary, and CPU-sized engine settings."""
    from gpt2serve.engine.tiny_model import build_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    args.model = str(build_tiny_checkpoint(root / "target"))
    args.draft_model = str(build_tiny_checkpoint(root / "draft", n_layer=1, n_embd=32, n_head=2, seed=1))
    args.load_format, args.dtype, args.device = "auto", "float32", "cpu"
    args.prompt_len, args.output_len, args.runs = 16, 24, 1
    args.batch_sizes, args.max_num_seqs, args.draft_kv_cache_gib = "1,2,4", 8, 0.01
    return {"cpu_kv_cache_gib": 0.05, "swap_space_gib": 0.01}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    overrides = _small_setup(args) if args.small else {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    if {"oracle", "always-wrong"} & set(modes) and "no-spec" not in modes:
        modes.insert(0, "no-spec")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    started = time.perf_counter()

    from gpt2serve import LLM, EngineConfig
    from gpt2serve.engine.loader import load_hf_config, resolve_device, resolve_dtype

    base = dict(model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
                enable_prefix_caching=False, max_num_seqs=max(args.max_num_seqs, *batches), **overrides)
    spec_ngram = {"method": "ngram", "num_speculative_tokens": args.k}
    spec_draft = {"method": "draft_model", "num_speculative_tokens": args.k, "draft_model": args.draft_model,
                  "draft_load_format": args.load_format, "draft_kv_cache_gib": args.draft_kv_cache_gib}
    device = resolve_device(EngineConfig(**base))
    dtype = resolve_dtype(EngineConfig(**base), device)
    common = {"workload": "W3-spec", "model": args.model, "draft_model": args.draft_model,
              "load_format": args.load_format, "dtype": str(dtype).removeprefix("torch."),
              "device": device_name(device), "commit": args.commit or git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "k": args.k, "prompt_len": args.prompt_len, "output_len": args.output_len}

    # Prompt sets: per batch size, one untimed set then ``runs`` timed ones; every mode runs the same prompts.
    rng = random.Random(8)
    prompt_sets: dict[int, list[list[list[int]]]] = {}
    references: dict[tuple[int, ...], list[int]] = {}
    records: list[dict[str, Any]] = []

    def record(mode: str, batch: int, body, extra: dict[str, Any]) -> None:
        rec = {**common, "engine": f"ours-{mode}", "mode": mode, "batch_size": batch, **extra}
        try:
            rec.update(body())
        except Exception as e:  # noqa: BLE001 - one failing measurement must not end the job
            traceback.print_exc()
            rec.update(error=f"{type(e).__name__}: {e}", errors=None)
        records.append(rec)
        _add_speedups(records)
        write_results(records, args.out, markdown_table)
        log(f"{mode} batch {batch}: " + (rec.get("error") or f"TPOT p50 {rec['tpot_ms_p50']} ms, acceptance "
                                          f"{rec.get('acceptance_rate')}, emitted/step {rec['mean_emitted_per_step']}"))

    def measure(llm, mode: str, batch: int, proposer_factory=None) -> dict[str, Any]:
        sets = prompt_sets[batch]
        timed, mismatches, compared, diverged = [], 0, 0, 0
        for i, prompts in enumerate(sets):
            if proposer_factory is not None:
                llm.engine.runner.proposer = proposer = proposer_factory()
            run = run_batch(llm, prompts, args.output_len, device)
            if mode == "no-spec":
                references.update((tuple(p), out) for p, out in zip(prompts, run["outputs"]))
            else:  # greedy speculation must give the target's own greedy outputs (up to fp16 near-ties)
                refs = [references.get(tuple(p)) for p in prompts]
                compared += sum(ref is not None for ref in refs)
                mismatches += sum(ref is not None and out != ref for ref, out in zip(refs, run["outputs"]))
            if proposer_factory is not None:
                diverged += proposer.num_diverged
            if i > 0:  # set 0 is the warm-up of this shape
                timed.append(run)
        rec = summarize(timed, args.output_len, batch, args.prompt_len, llm.engine.config.max_num_batched_tokens)
        if compared:  # over all sets, the untimed one included
            rec["outputs_differing_from_no_spec"] = mismatches
        if proposer_factory is not None:
            rec["oracle_diverged_requests"] = diverged
        return rec

    def with_engine(label: str, config: dict[str, Any], jobs) -> None:
        """Build one engine, run ``jobs`` [(mode, body(llm, batch))] on it for every batch size, free it."""
        llm, extra = None, {}
        try:
            t = time.perf_counter()
            llm = LLM(EngineConfig(**config))
            if config.get("load_format") == "dummy":
                widen_greedy_margins(llm.engine.runner.model)
                extra["greedy_margins_widened"] = True
            extra["startup_s"] = round(time.perf_counter() - t, 2)
            extra["engine_args"] = llm.engine.config.model_dump(mode="json")
            warm_up_engine(llm)
            log(f"{label} engine up in {extra['startup_s']} s")
            if config.get("speculative") and not hasattr(llm.engine.runner, "proposer"):
                raise RuntimeError("the engine's runner has no proposer: speculative decoding is not integrated")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            failure = f"engine start-up failed: {type(e).__name__}: {e}"

            def fail() -> dict[str, Any]:
                raise RuntimeError(failure)

            for mode, _ in jobs:
                for b in batches:
                    record(mode, b, fail, {})
            llm = None
        if llm is not None:
            for mode, body in jobs:
                for b in batches:
                    record(mode, b, lambda: body(llm, b), extra)
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    vocab = load_hf_config(EngineConfig(**base)).vocab_size
    for b in batches:
        prompt_sets[b] = [[[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(b)]
                          for _ in range(args.runs + 1)]

    if "no-spec" in modes:
        with_engine("no-spec", base, [("no-spec", lambda llm, b: measure(llm, "no-spec", b))])
    oracle_jobs = [(m, (lambda llm, b, m=m: measure(llm, m, b, lambda: OracleProposer(
        references, vocab, shift=0 if m == "oracle" else 1)))) for m in ("oracle", "always-wrong") if m in modes]
    if oracle_jobs:
        with_engine("ngram (oracle proposers)", {**base, "speculative": spec_ngram}, oracle_jobs)
    if "draft" in modes:
        with_engine("draft", {**base, "speculative": spec_draft},
                    [("draft", lambda llm, b: {**measure(llm, "draft", b),
                                                **_proposer_stats(llm)})])

    write_results(records, args.out, markdown_table)
    print(markdown_table(records))
    log(f"done in {time.perf_counter() - started:.0f} s" + (f"; wrote {args.out}" if args.out else ""))
    return records


def _proposer_stats(llm) -> dict[str, Any]:
    proposer = getattr(llm.engine.runner, "proposer", None)
    return {"proposer_stats": proposer.stats()} if proposer is not None else {}


def _add_speedups(records: list[dict[str, Any]]) -> None:
    """speedup_vs_no_spec: the baseline's TPOT over this record's, at the same batch size (> 1: faster)."""
    base = {r["batch_size"]: r["tpot_ms_p50"] for r in records if r["mode"] == "no-spec" and r.get("tpot_ms_p50")}
    for r in records:
        if r["mode"] != "no-spec" and r.get("tpot_ms_p50") and r["batch_size"] in base:
            r["speedup_vs_no_spec"] = round(base[r["batch_size"]] / r["tpot_ms_p50"], 3)


def markdown_table(records: list[dict[str, Any]]) -> str:
    head = records[0] if records else {}
    lines = [f"Speculative decoding: {head.get('model')} verifying k = {head.get('k')} "
             f"(draft {head.get('draft_model')}), {head.get('dtype')} {head.get('load_format')} weights on "
             f"{head.get('device')}, commit {head.get('commit')}, {head.get('date')}; {head.get('prompt_len')}-token "
             f"prompts, {head.get('output_len')} greedy output tokens", "",
             "| proposer | batch | TPOT p50 ms | vs no-spec | acceptance | emitted / step | out tok/s | TTFT p50 ms "
             "| errors / note |", "|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    for r in records:
        if r.get("error"):
            lines.append(f"| {r['mode']} | {r['batch_size']} | | | | | | | {r['error'][:120]} |")
            continue
        note = str(r.get("errors"))
        if r.get("outputs_differing_from_no_spec"):
            note += f"; {r['outputs_differing_from_no_spec']} outputs differ from no-spec"
        if r.get("oracle_diverged_requests"):
            note += f"; oracle lost {r['oracle_diverged_requests']}"
        speedup, acc = r.get("speedup_vs_no_spec"), r.get("acceptance_rate")
        lines.append(f"| {r['mode']} | {r['batch_size']} | {f(r.get('tpot_ms_p50'), '.3f')} "
                     f"| {'x' + format(speedup, '.2f') if speedup else '—'} "
                     f"| {'—' if acc is None else format(100 * acc, '.1f') + ' %'} "
                     f"| {f(r.get('mean_emitted_per_step'), '.2f')} | {f(r.get('out_tok_s'), ',.1f')} "
                     f"| {f(r.get('ttft_ms_p50'), '.2f')} | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
