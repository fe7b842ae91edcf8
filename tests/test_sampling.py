"""Sampling: seeds, truncation (top-k / top-p / min-p), temperature, penalties, stop conditions, n > 1."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2serve import SamplingParams
from gpt2serve.engine.sampler import Sampler, SamplingRow
from tests.conftest import run_to_completion

PROMPTS = [[5, 17, 99, 3], list(range(40, 90)), [7] * 20, [300, 2, 44, 18, 250, 1, 9]]


def generate(engine, prompts, params_list, prefix="r"):
    for i, (p, params) in enumerate(zip(prompts, params_list)):
        engine.add_request(f"{prefix}{i}", p, params)
    done = run_to_completion(engine)
    return [done[f"{prefix}{i}"] for i in range(len(prompts))]


def test_seeded_requests_reproduce_whatever_the_batch(make_engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=42)
    alone = generate(make_engine(), PROMPTS[:1], [params])[0].outputs[0].token_ids
    # Same request inside a busy batch, with a pool so small that it is preempted along the way.
    engine = make_engine(num_gpu_blocks=10, block_size=8, max_num_batched_tokens=16)
    others = [SamplingParams(max_tokens=16, temperature=1.0) for _ in PROMPTS[1:]]
    busy = generate(engine, PROMPTS[1:] + PROMPTS[:1], others + [params])[-1].outputs[0].token_ids
    assert engine.scheduler.counters["preemptions_recompute"] > 0
    assert busy == alone
    other_seed = generate(make_engine(), PROMPTS[:1], [SamplingParams(max_tokens=16, temperature=1.0, seed=43)])
    assert other_seed[0].outputs[0].token_ids != alone


@pytest.mark.parametrize("temperature", [0.0, 1e-6, 1e-4])
def test_temperature_to_zero_is_greedy(make_engine, temperature):
    greedy = [o.outputs[0].token_ids for o in generate(make_engine(), PROMPTS, [SamplingParams(max_tokens=12, temperature=0)] * 4)]
    params = [SamplingParams(max_tokens=12, temperature=temperature, seed=i) for i in range(4)]
    cold = [o.outputs[0].token_ids for o in generate(make_engine(), PROMPTS, params)]
    assert cold == greedy


def allowed_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Independent statement of the truncation rules, tolerant to how ties are ordered."""
    x = logits.double() / temperature
    if top_k > 0:
        kth = torch.sort(x, descending=True).values[min(top_k, len(x)) - 1]
        x = torch.where(x >= kth, x, torch.tensor(float("-inf"), dtype=x.dtype))
    p = torch.softmax(x, dim=0)
    keep = p > 0
    if top_p < 1.0:
        # A token may be kept only if the mass of strictly more likely tokens is below top_p.
        mass_above = torch.stack([p[p > p[i]].sum() for i in range(len(p))])
        keep &= mass_above < top_p + 1e-6
    if min_p > 0:
        keep &= p >= min_p * p.max() - 1e-9
    return set(torch.nonzero(keep).flatten().tolist())


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(2, 40), data_seed=st.integers(0, 10_000), temperature=st.floats(0.1, 3.0),
    top_k=st.sampled_from([0, 1, 2, 5, 17]), top_p=st.floats(0.05, 1.0), min_p=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
)
def test_truncation_never_emits_a_disallowed_token(vocab, data_seed, temperature, top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(data_seed)
    logits = torch.randn(vocab, generator=gen) * 3
    logits[torch.randint(vocab, (2,), generator=gen)] = logits.max()  # ties at the top make it harder
    allowed = allowed_tokens(logits, temperature, top_k, top_p, min_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = [SamplingRow(params, [0], 1, 0)] * 64
    tokens, _ = Sampler(torch.device("cpu"), seed=data_seed)(logits.repeat(64, 1), rows)
    assert set(tokens) <= allowed


def test_sampling_follows_the_distribution():
    """With no truncation, 20k draws over 4 tokens land within 2% of softmax(logits)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    params = SamplingParams(temperature=1.0)
    tokens, _ = Sampler(torch.device("cpu"), seed=1)(logits.repeat(20_000, 1), [SamplingRow(params, [0], 1, 0)] * 20_000)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).double() / 20_000
    assert torch.allclose(freq, torch.softmax(logits.double(), 0), atol=0.02)


def test_penalties_change_the_greedy_choice():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]] * 4)
    rows = [
        SamplingRow(SamplingParams(temperature=0), [3, 0], 1, 0),  # no penalty: token 0
        SamplingRow(SamplingParams(temperature=0, frequency_penalty=0.2), [3, 0], 1, 0),  # 2.0 - 0.2 < 1.9
        SamplingRow(SamplingParams(temperature=0, presence_penalty=0.2), [3, 0, 0], 1, 0),
        SamplingRow(SamplingParams(temperature=0, repetition_penalty=1.1), [0], 1, 0),  # 2.0 / 1.1 < 1.9
    ]
    tokens, _ = sampler(logits, rows)
    assert tokens == [0, 1, 1, 1]
    # Repetition penalty multiplies negative logits: a seen token at -1.0 falls further behind.
    logits = torch.tensor([[-1.0, -1.05]])
    assert sampler(logits, [SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), [0], 1, 0)])[0] == [1]


def test_stop_strings_across_token_boundaries(make_engine):
    base = generate(make_engine(), [PROMPTS[3]], [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)])[0]
    seq = base.outputs[0]
    engine = make_engine()
    pieces = [engine.tokenizer.decode([t]) for t in seq.token_ids]
    # A stop string made of the end of token 5 and the start of token 6: it exists only across the boundary.
    boundary = len("".join(pieces[:6]))
    text = seq.text
    assert len(pieces[5]) >= 1 and len(pieces[6]) >= 1
    stop = text[boundary - 1:boundary + 1]
    first = text.find(stop)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    engine.add_request("s", PROMPTS[3], params, stream=True)
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas += [c.text for c in out.outputs]
            final = out
    streamed = "".join(deltas)
    assert streamed == text[:first]
    assert stop not in streamed
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == stop


def test_stop_token_ids_max_tokens_and_eos(make_engine):
    seq = generate(make_engine(), [PROMPTS[1]], [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)])[0].outputs[0]
    stop_id = seq.token_ids[7]
    first = seq.token_ids.index(stop_id)
    out = generate(make_engine(), [PROMPTS[1]], [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_id])])[0].outputs[0]
    assert out.token_ids == seq.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert generate(make_engine(), [PROMPTS[1]], [SamplingParams(max_tokens=5, temperature=0)])[0].outputs[0].finish_reason == "length"
    # EOS ends a sequence unless ignore_eos: make EOS the greedy token's id by asking the engine to treat it so.
    engine = make_engine()
    engine.tokenizer.eos_token_id = seq.token_ids[3]
    out = generate(engine, [PROMPTS[1]], [SamplingParams(max_tokens=20, temperature=0)])[0].outputs[0]
    assert out.token_ids == seq.token_ids[:seq.token_ids.index(seq.token_ids[3]) + 1] and out.finish_reason == "stop"


def test_n_samples_share_the_prompt_blocks(make_engine):
    engine = make_engine(block_size=8)
    prompt = list(range(1, 37))  # 36 tokens: 4 full blocks and a partial one
    engine.add_request("n", prompt, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5))
    shared_seen = False
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        tables = list(engine.kv.tables.values())
        if len(tables) == 3:
            # The 4 full prompt blocks are one set of physical blocks referenced by all three samples.
            heads = {tuple(t[:4]) for t in tables}
            shared_seen |= len(heads) == 1 and all(engine.kv.pool.ref_counts[b] == 3 for b in tables[0][:4])
    assert shared_seen
    outs = done["n"].outputs
    assert [o.index for o in outs] == [0, 1, 2] and all(len(o.token_ids) == 6 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1  # different draws
    # Sample 0 is the same draw as a single request with that seed.
    single = generate(make_engine(block_size=8), [prompt], [SamplingParams(max_tokens=6, temperature=1.0, seed=5)])
    assert single[0].outputs[0].token_ids == outs[0].token_ids
    # Greedy samples are all equal to the greedy output.
    greedy = generate(make_engine(block_size=8), [prompt], [SamplingParams(n=2, max_tokens=6, temperature=0)])[0]
    single_greedy = generate(make_engine(block_size=8), [prompt], [SamplingParams(max_tokens=6, temperature=0)], "g")[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == single_greedy.outputs[0].token_ids


def test_n_samples_survive_preemption(make_engine):
    engine = make_engine(block_size=8, num_gpu_blocks=12, max_num_batched_tokens=16, preemption_policy="swap")
    prompts = [[random.Random(i).randrange(400) for _ in range(30)] for i in range(3)]
    outs = generate(engine, prompts, [SamplingParams(n=2, max_tokens=10, temperature=0)] * 3)
    ref = generate(make_engine(block_size=8), prompts, [SamplingParams(max_tokens=10, temperature=0)] * 3, "x")
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == o.outputs[1].token_ids == r.outputs[0].token_ids
    assert engine.scheduler.counters["preemptions_swap"] + engine.scheduler.counters["preemptions_recompute"] > 0
