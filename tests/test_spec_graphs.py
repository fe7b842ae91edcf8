"""CUDA graphs of speculative verify steps: every request padded to q = 1 + k query tokens.

The layout (``verify_layout``) and the ladder are pure functions, tested on their own. Attention is checked at the
kernel level: the padded layout's real rows attend exactly as the unpadded step's do, in the reference and in the
Triton kernel. The engine tests drive the runner's graph path on the CPU with graphs whose replay re-runs their
forward (the static buffers, padding and bucket choice of the GPU path, without CUDA), and compare greedy output
with HF's; the GPU test captures real graphs and compares speculation on and off.
"""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gpt2serve.engine.model_runner as model_runner
from gpt2serve import SamplingParams
from gpt2serve.engine.cuda_graphs import DecodeGraphs, verify_bucket_sizes, verify_layout
from gpt2serve.kernels.attention_ref import paged_attention_ref
from gpt2serve.kernels.paged_attention import paged_attention
from tests.conftest import hf_greedy, run_to_completion

# --- layout -------------------------------------------------------------------------------------------------


def _eager_rows(num_spec):
    """The flat batch's logits rows exactly as ``ModelRunner._prepare`` picks them: each plain decode's last row,
    and each verifying request's last m + 1 rows."""
    counts = np.asarray(num_spec) + 1
    starts = np.concatenate([[0], np.cumsum(counts)])
    sample = starts[1:][np.asarray(num_spec) == 0] - 1
    spec = [np.arange(starts[i + 1] - 1 - m, starts[i + 1]) for i, m in enumerate(num_spec) if m]
    return sample, np.concatenate(spec) if spec else np.zeros(0, dtype=np.int64)


def test_layout_pads_after_each_requests_real_tokens():
    layout = verify_layout(np.array([2, 0, 3, 1]), 4)
    assert layout.token_rows.tolist() == [0, 1, 2, 4, 8, 9, 10, 11, 12, 13]
    assert layout.query_start_loc.tolist() == [0, 4, 8, 12, 16] and layout.num_rows == 16
    slots = layout.pad(np.arange(100, 110), -1)
    assert slots.tolist() == [100, 101, 102, -1, 103, -1, -1, -1, 104, 105, 106, 107, 108, 109, -1, -1]
    # The rows _verify and the sampler read: request i's last token is row i * q, its j-th proposal's verdict row
    # i * q + j; never a padding row.
    sample, spec = _eager_rows([2, 0, 3, 1])
    assert layout.token_rows[sample].tolist() == [4]
    assert layout.token_rows[spec].tolist() == [0, 1, 2, 8, 9, 10, 11, 12, 13]


def test_layout_of_random_steps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = int(rng.integers(2, 9))
        num_spec = rng.integers(0, q, size=int(rng.integers(1, 12)))
        layout = verify_layout(num_spec, q)
        real = np.zeros(layout.num_rows, dtype=bool)
        real[layout.token_rows] = True
        # Request i's real tokens fill the first 1 + m_i of its q rows, in order; everything else is padding.
        expect = (np.arange(q)[None, :] <= num_spec[:, None]).ravel()
        assert (real == expect).all() and (np.diff(layout.token_rows) > 0).all()
        sample, spec = _eager_rows(num_spec)
        assert real[layout.token_rows[np.concatenate([sample, spec]).astype(np.int64)]].all()
        assert (layout.token_rows[sample] % q == 0).all()


def test_layout_refuses_more_proposals_than_the_graph_holds():
    with pytest.raises(AssertionError):
        verify_layout(np.array([1, 4]), 4)


def test_verify_ladder():
    # Doubling to 64, then steps of 64, up to max_num_seqs, while b * q stays within 512 tokens.
    assert verify_bucket_sizes(256, 5) == [1, 2, 4, 8, 16, 32, 64]
    assert verify_bucket_sizes(256, 2) == [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]
    assert verify_bucket_sizes(300, 2) == [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]
    assert verify_bucket_sizes(8, 4) == [1, 2, 4, 8]
    assert verify_bucket_sizes(6, 4) == [1, 2, 4, 6]
    assert verify_bucket_sizes(1, 17) == [1]
    assert verify_bucket_sizes(64, 17, max_tokens=100) == [1, 2, 4]


# --- attention over the padded layout --------------------------------------------------------------------------


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_padding_is_invisible_to_the_real_tokens(kernel):
    """The real rows of a padded verify step attend exactly as the unpadded step's. The pool holds garbage at the
    padding's positions (their K/V are never written), the block tables point anywhere past the real tokens'
    blocks (stale entries), and a padding request fills the bucket."""
    gen = torch.Generator().manual_seed(0)
    heads, dim, bs, q, num_blocks = 2, 32, 4, 4, 40
    computed, num_spec = np.array([5, 17, 30]), np.array([2, 0, 3])
    counts = num_spec + 1
    pool = torch.randn(2, num_blocks, bs, heads, dim, generator=gen)
    width = -(-int((computed + q).max()) // bs)  # room for the padding's positions
    tables = torch.randint(0, num_blocks, (4, width), generator=gen, dtype=torch.int32)
    owned = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    for i, n in enumerate(-(-(computed + counts) // bs)):  # each real request's own blocks
        tables[i, :n] = owned[:n]
        owned = owned[n:]

    layout = verify_layout(num_spec, q)
    real_q = torch.randn(int(counts.sum()), heads, dim, generator=gen)
    padded_q = torch.randn(4 * q, heads, dim, generator=gen) * 10  # garbage in the padding rows
    padded_q[torch.from_numpy(layout.token_rows)] = real_q

    def attend(qs, seq_lens, starts, num_seqs, max_query_len):
        fn = paged_attention_ref if kernel == "reference" else paged_attention
        dev = lambda a, dtype=torch.int32: torch.as_tensor(np.asarray(a)).to(DEVICE, dtype)  # noqa: E731
        out = fn(qs.to(DEVICE), pool.to(DEVICE), tables[:num_seqs].contiguous().to(DEVICE), dev(seq_lens),
                 dev(starts), max_query_len, int(max(seq_lens)), dim ** -0.5)
        return out.cpu()

    eager = attend(real_q, computed + counts, np.concatenate([[0], np.cumsum(counts)]), 3, int(counts.max()))
    # Bucket of 4: the fourth request is padding, q tokens over a context of q.
    padded = attend(padded_q, np.concatenate([computed + q, [q]]), np.arange(5) * q, 4, q)
    torch.testing.assert_close(padded[torch.from_numpy(layout.token_rows)], eager, rtol=1e-5, atol=1e-5)


# --- engine -------------------------------------------------------------------------------------------------

NEW = 24


@pytest.fixture(scope="module")
def prompts_and_reference(hf_model):
    """Prompts that repeat phrases of different lengths (prompt lookup then proposes 1..k tokens, and sometimes
    nothing), one with nothing to look up, and their HF greedy output."""
    rng = random.Random(5)
    vocab = hf_model.config.vocab_size
    prompts = []
    for n in (4, 9, 15, 2, 11, 6):
        phrase = [rng.randrange(vocab) for _ in range(n)]
        prompts.append((phrase * (1 + 50 // n))[: 30 + n] + phrase[:2])
    prompts.append([rng.randrange(vocab) for _ in range(25)])
    return prompts, [hf_greedy(hf_model, p, NEW) for p in prompts]


def ngram(k=3, **extra):
    return {"speculative": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3}, **extra}


class _EagerGraphs(DecodeGraphs):
    """Graphs whose replay re-runs the captured forward: the static buffers, padding and bucket choice of the graph
    path, without CUDA."""

    def _capture(self, forward, device):
        logits = forward()
        return SimpleNamespace(replay=lambda: logits.copy_(forward())), logits


def _with_eager_graphs(engine):
    r = engine.runner
    q = 1 + r.num_spec_tokens if r.config.speculative else None
    r.graphs = _EagerGraphs(r.model, r.kv_caches, r.config.max_num_seqs, r.max_blocks_per_seq, r.max_model_len,
                            r.device, verify_query_len=q)
    return r


def _run(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = run_to_completion(engine)
    return [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]


def _watch(runner, monkeypatch):
    """Record each verify-graph step's proposal counts, and count the steps that verified anything."""
    seen = SimpleNamespace(layouts=[], verify_steps=0)

    def spy(num_spec, q):
        seen.layouts.append(np.array(num_spec))
        return verify_layout(num_spec, q)

    monkeypatch.setattr(model_runner, "verify_layout", spy)
    execute = runner.execute

    def counting(sched):
        seen.verify_steps += bool(sched.scheduled_spec_tokens)
        return execute(sched)

    monkeypatch.setattr(runner, "execute", counting)
    return seen


GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("backend, num_prompts, max_num_seqs", [
    ("torch", 7, 8),
    # The Triton kernels through the interpreter, on fewer requests (~15 s).
    pytest.param("triton", 4, 4, marks=[pytest.mark.slow, pytest.mark.skipif(
        torch.cuda.is_available(), reason="the interpreter runs only where there is no GPU (conftest); "
        "test_verify_graphs_on_the_gpu covers this there")]),
])
def test_verify_graph_steps_equal_hf(make_engine, prompts_and_reference, monkeypatch, backend, num_prompts,
                                     max_num_seqs):
    # A step budget of 48 tokens prefills the prompts over several steps, beside requests already verifying: those
    # mixed steps run eagerly, the later ones (decodes and verifies only) replay verify graphs, with requests of 0,
    # some and k proposals side by side and buckets padded with padding requests.
    prompts, reference = (x[:num_prompts] for x in prompts_and_reference)
    engine = make_engine(**ngram(3), attention_backend=backend, max_num_batched_tokens=48, max_num_seqs=max_num_seqs)
    runner = _with_eager_graphs(engine)
    assert runner.graphs.verify_sizes == [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    seen = _watch(runner, monkeypatch)
    assert _run(engine, prompts, GREEDY) == reference
    assert 0 < runner.verify_graph_steps < seen.verify_steps  # some verify steps had prefill beside them
    assert len(seen.layouts) == runner.verify_graph_steps
    assert any((m == 0).any() and (m > 0).any() for m in seen.layouts)
    assert any(((m > 0) & (m < 3)).any() for m in seen.layouts) and any((m == 3).any() for m in seen.layouts)
    assert any(len(m) not in runner.graphs.verify_sizes for m in seen.layouts)  # with padding requests


def test_verify_graphs_equal_eager_and_no_speculation(make_engine, prompts_and_reference):
    prompts, reference = prompts_and_reference
    # Without speculation the same graphs serve every decode step (no verify graphs are captured).
    plain = make_engine(max_num_batched_tokens=512)
    assert _with_eager_graphs(plain).graphs.verify_sizes == []
    assert _run(plain, prompts, GREEDY) == reference
    # Seeded sampling: the rejection rule draws the same numbers from the same logits, graph or eager.
    sampled = SamplingParams(max_tokens=NEW, temperature=0.9, top_k=30, seed=11, ignore_eos=True)
    eager = make_engine(**ngram(4), max_num_batched_tokens=512)
    graphed = make_engine(**ngram(4), max_num_batched_tokens=512)
    runner = _with_eager_graphs(graphed)
    assert _run(eager, prompts, sampled) == _run(graphed, prompts, sampled)
    assert runner.verify_graph_steps > 0 and eager.runner.verify_graph_steps == 0


def test_oversize_steps_stay_eager(make_engine, prompts_and_reference, monkeypatch):
    # A ladder that stops at 2 requests: two requests replay verify graphs, seven verify eagerly.
    monkeypatch.setattr("gpt2serve.engine.cuda_graphs.VERIFY_GRAPH_MAX_TOKENS", 8)
    prompts, reference = prompts_and_reference
    engine = make_engine(**ngram(3), max_num_batched_tokens=512)
    runner = _with_eager_graphs(engine)
    assert runner.graphs.verify_sizes == [1, 2]
    seen = _watch(runner, monkeypatch)
    assert _run(engine, prompts[:2], GREEDY) == reference[:2]
    assert runner.verify_graph_steps == seen.verify_steps > 0
    assert _run(engine, prompts, GREEDY) == reference
    assert runner.verify_graph_steps < seen.verify_steps
    assert all(len(m) <= 2 for m in seen.layouts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_graphs_on_the_gpu(make_engine, prompts_and_reference, monkeypatch):
    # fp32, as the other engine-level GPU comparisons. Every prompt is prefilled in the first step, so every later
    # verify step qualifies for a graph: all of them replay one.
    prompts, _ = prompts_and_reference
    settings = dict(device="cuda", attention_backend="triton", dtype="float32", num_gpu_blocks=4096,
                    max_num_seqs=64, max_num_batched_tokens=1024)
    off = _run(make_engine(**settings), prompts, GREEDY)
    engine = make_engine(**ngram(4), **settings)
    runner = engine.runner
    assert runner.graphs.verify_sizes == [1, 2, 4, 8, 16, 32, 64]
    seen = _watch(runner, monkeypatch)
    on = _run(engine, prompts, GREEDY)
    assert on == off
    assert runner.verify_graph_steps == seen.verify_steps > 0
    assert engine.scheduler.counters["spec_num_accepted_tokens"] > 0
    eager = make_engine(**ngram(4), **settings, enforce_eager=True)
    assert _run(eager, prompts, GREEDY) == off and eager.runner.verify_graph_steps == 0
