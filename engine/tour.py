"""A tour of the engine's main ideas, measured on the tiny model on a CPU: ``python -m gpt2serve.engine tour``.

Each demo runs this engine and returns its table as rows of plain values (the tests check them; ``print_demos``
draws them). Nothing here is a quoted figure: every step count, token count and millisecond is measured now.

- ``kv_cache``: one prompt decoded with the paged KV cache against recomputing the whole sequence every step.
- ``batched_prefill``: k prompts prefilled in one step against one after another.
- ``continuous_batching``: 2 long and 3 short requests, continuous against static batching.
- ``sampling``: greedy against seeded sampling of one prompt.

Step counts and token positions do not depend on the machine; wall times do, and on the tiny model (2 layers of
width 64) a step's fixed cost outweighs its arithmetic, so the wall-time ratios say little about GPT-2 on a GPU:
the counts are what carries over.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.llm_engine import LLMEngine
from gpt2serve.engine.outputs import SchedulerOutput
from gpt2serve.engine.sampling_params import SamplingParams


@dataclass
class Demo:
    name: str
    title: str
    rows: list[dict]
    note: str = ""
    summary: dict = field(default_factory=dict)  # totals that are not a row (steps of a whole run)


@dataclass
class Trace:
    """What an engine did, step by step: fed by its schedule observer and by the outputs of ``run``."""

    steps: int = 0
    positions: int = 0  # token positions the model computed: scheduled tokens summed over steps
    joined: dict[str, int] = field(default_factory=dict)  # request -> step it was first scheduled in
    finished: dict[str, int] = field(default_factory=dict)  # request -> step its last token came out of
    finished_ms: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    def observe(self, sched: SchedulerOutput) -> None:
        self.steps += 1
        self.positions += sched.total_num_scheduled_tokens
        for req_id in sched.num_scheduled_tokens:
            self.joined.setdefault(req_id, self.steps)


def _engine(model_dir: str | Path, **overrides) -> tuple[LLMEngine, Trace]:
    # Prefix caching is off throughout: a demo that repeats a prompt (a warm-up, a serial run after a batched
    # one) would otherwise find its K/V cached and measure the prefix cache instead of the idea on show.
    settings = dict(model=str(model_dir), device="cpu", dtype="float32", num_gpu_blocks=256, block_size=16,
                    max_num_batched_tokens=512, max_num_seqs=8, swap_space_gib=0, enable_prefix_caching=False)
    engine = LLMEngine(EngineConfig(**{**settings, **overrides}))
    trace = Trace()
    engine.schedule_observers.append(trace.observe)
    return engine, trace


def run(engine: LLMEngine, trace: Trace, start: float) -> None:
    """Step until idle; every request must leave the KV pool exactly as it found it."""
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                trace.finished[out.request_id] = trace.steps
                trace.finished_ms[out.request_id] = 1000 * (time.perf_counter() - start)
                trace.tokens[out.request_id] = out.outputs[0].token_ids
                trace.texts[out.request_id] = out.outputs[0].text
    engine.kv.check_invariants()
    assert engine.kv.all_free(), f"KV blocks still held: {engine.stats()}"


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)


def _prompts(engine: LLMEngine, k: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(engine.vocab_size) for _ in range(length)] for _ in range(k)]


def _warm_up(engine: LLMEngine, trace: Trace) -> None:
    """One untimed request: the first forward pass of a process pays one-time costs that belong to no demo."""
    engine.add_request("warm-up", _prompts(engine, 1, 16, seed=99)[0], _greedy(4))
    run(engine, trace, time.perf_counter())


def kv_cache(model_dir: str | Path, prompt_len: int = 64, new_tokens: int = 192) -> Demo:
    engine, trace = _engine(model_dir)
    _warm_up(engine, trace)
    prompt = _prompts(engine, 1, prompt_len, seed=1)[0]

    before, start = (trace.steps, trace.positions), time.perf_counter()
    engine.add_request("cached", prompt, _greedy(new_tokens))
    run(engine, trace, start)
    cached_ms = 1000 * (time.perf_counter() - start)
    cached = (trace.steps - before[0], trace.positions - before[1], trace.tokens["cached"])

    # Without a cache each new token costs a forward pass over the whole sequence so far. A fresh request per
    # token, with prefix caching off, is exactly that on the same model and kernels: nothing computed is reused.
    sequence, before, start = list(prompt), (trace.steps, trace.positions), time.perf_counter()
    for i in range(new_tokens):
        engine.add_request(f"recompute-{i}", sequence, _greedy(1))
        run(engine, trace, start)
        sequence += trace.tokens[f"recompute-{i}"]
    recompute_ms = 1000 * (time.perf_counter() - start)
    recompute = (trace.steps - before[0], trace.positions - before[1], sequence[prompt_len:])

    rows = [
        {"mode": "paged KV cache (the engine)", "steps": cached[0], "token positions computed": cached[1],
         "wall ms": cached_ms, "speed-up": recompute_ms / cached_ms, "same tokens": None},
        {"mode": "no cache: recompute the sequence each step", "steps": recompute[0],
         "token positions computed": recompute[1], "wall ms": recompute_ms, "speed-up": 1.0,
         "same tokens": recompute[2] == cached[2]},
    ]
    return Demo("kv_cache", f"(a) KV cache on and off: {new_tokens} greedy tokens after a {prompt_len}-token prompt",
                rows, "With the cache a step computes only the new token: prompt + new - 1 positions in all. "
                "Without it step i recomputes all prompt + i positions: a triangular sum.")


def batched_prefill(model_dir: str | Path, k: int = 8, prompt_len: int = 48) -> Demo:
    engine, trace = _engine(model_dir, max_num_batched_tokens=max(512, k * prompt_len), max_num_seqs=max(8, k))
    _warm_up(engine, trace)
    rows = []
    for mode, seed in (("batched: all k in one step", 2), ("serial: one prompt per step", 3)):
        prompts = _prompts(engine, k, prompt_len, seed)
        before, start = (trace.steps, trace.positions), time.perf_counter()
        if mode.startswith("batched"):
            for i, prompt in enumerate(prompts):
                engine.add_request(f"{seed}-{i}", prompt, _greedy(1))
            run(engine, trace, start)
        else:
            for i, prompt in enumerate(prompts):
                engine.add_request(f"{seed}-{i}", prompt, _greedy(1))
                run(engine, trace, start)
        wall_ms = 1000 * (time.perf_counter() - start)
        rows.append({"mode": mode, "prompts": k, "steps": trace.steps - before[0],
                     "token positions computed": trace.positions - before[1], "wall ms": wall_ms})
    for row in rows:
        row["speed-up"] = rows[1]["wall ms"] / row["wall ms"]
    return Demo("batched_prefill", f"(b) Prefill of {k} prompts of {prompt_len} tokens, batched and serial", rows,
                "The same positions are computed either way; batched, they share one forward pass, so the step's "
                "fixed cost (scheduling, input preparation, kernel launches, reading the weights) is paid once.")


def continuous_batching(model_dir: str | Path, long_tokens: int = 40, short_tokens: int = 8,
                        batch_size: int = 3) -> Demo:
    lengths = {"long-1": long_tokens, "long-2": long_tokens,
               "short-1": short_tokens, "short-2": short_tokens, "short-3": short_tokens}
    rows, summary = [], {}
    for mode in ("continuous", "static"):
        engine, trace = _engine(model_dir, max_num_seqs=batch_size)
        _warm_up(engine, trace)
        prompts = dict(zip(lengths, _prompts(engine, len(lengths), 16, seed=4)))
        trace.steps, trace.positions, start = 0, 0, time.perf_counter()
        if mode == "continuous":
            # All arrive at once; the scheduler runs batch_size of them and admits the next as soon as one ends.
            for rid, n in lengths.items():
                engine.add_request(rid, prompts[rid], _greedy(n))
            run(engine, trace, start)
        else:
            # A static batch is padded to its longest request and returns when that one ends, as `generate` does;
            # the next batch starts only then.
            ids = list(lengths)
            for batch in (ids[i:i + batch_size] for i in range(0, len(ids), batch_size)):
                longest = max(lengths[rid] for rid in batch)
                for rid in batch:
                    engine.add_request(rid, prompts[rid], _greedy(longest))
                run(engine, trace, start)
        rows += [{"batching": mode, "request": rid, "output tokens": n, "joined at step": trace.joined[rid],
                  "finished at step": trace.finished[rid], "finished at ms": trace.finished_ms[rid]}
                 for rid, n in lengths.items()]
        summary[mode] = {"steps": trace.steps, "token positions computed": trace.positions,
                         "wall ms": 1000 * (time.perf_counter() - start)}
    c, s = summary["continuous"], summary["static"]
    return Demo("continuous_batching", f"(c) Continuous and static batching, {batch_size} sequences at a time",
                rows, f"Continuous: {c['steps']} steps, {c['token positions computed']} token positions, "
                f"{c['wall ms']:.0f} ms. Static: {s['steps']} steps, {s['token positions computed']} token positions "
                f"(padding included), {s['wall ms']:.0f} ms. With continuous batching a short request's slot goes to "
                "the next request the step after it ends; a static batch holds every slot until its longest ends.",
                summary)


def sampling(model_dir: str | Path, new_tokens: int = 24, prompt: str = "def parse_args(self, args=None):") -> Demo:
    engine, trace = _engine(model_dir)
    runs = [("greedy #1", 0.0, None), ("greedy #2", 0.0, None),
            ("sampled, seed 1", 1.0, 1), ("sampled, seed 2", 1.0, 2), ("sampled, seed 1 again", 1.0, 1)]
    for rid, temperature, seed in runs:
        engine.add_request(rid, prompt, SamplingParams(temperature=temperature, seed=seed, max_tokens=new_tokens,
                                                       ignore_eos=True))
    run(engine, trace, time.perf_counter())
    rows = [{"run": rid, "temperature": temperature, "seed": seed, "text": trace.texts[rid],
             "same as greedy #1": trace.tokens[rid] == trace.tokens["greedy #1"],
             "same as seed 1": trace.tokens[rid] == trace.tokens["sampled, seed 1"]}
            for rid, temperature, seed in runs]
    return Demo("sampling", f"(d) Greedy and sampled continuations of {prompt!r} ({new_tokens} tokens)", rows,
                "Greedy takes the argmax and is the same every time; sampling at temperature 1 draws from the whole "
                "distribution, and a seed makes the draws repeatable whatever else is in the batch.")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """On a busy shared CPU, OpenMP's threads wait for one another far longer than a tiny layer takes: one
    thread makes steps steadier and faster. Restored afterwards, since the caller's process may want more."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_tour(model_dir: str | Path | None = None, threads: int | None = 1) -> list[Demo]:
    with contextlib.ExitStack() as stack, torch_threads(threads):
        if model_dir is None:
            from gpt2serve.engine.tiny_model import build_tiny_checkpoint

            model_dir = build_tiny_checkpoint(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tiny")
        return [demo(model_dir) for demo in (kv_cache, batched_prefill, continuous_batching, sampling)]


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}" if value.is_integer() else f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if isinstance(value, str):
        return value.replace("\n", "\\n")  # a generated newline would otherwise split the row
    return "—" if value is None else str(value)


def print_demos(demos: list[Demo]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 120  # rich assumes 80 columns when piped, which folds every wide table
    for demo in demos:
        table = Table(title=demo.title, caption=demo.note, title_justify="left", caption_justify="left")
        for column in demo.rows[0]:
            table.add_column(column, overflow="fold")
        for row in demo.rows:
            table.add_row(*(_cell(v) for v in row.values()))
        console.print(table)
        console.print()
