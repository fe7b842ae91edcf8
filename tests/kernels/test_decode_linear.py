"""Fused small-batch linear (LN prologue, bias / GELU / residual epilogue, split-K) vs its PyTorch reference.

On a CPU machine the kernel runs in the Triton interpreter at small, deliberately tile-unaligned shapes; the
``gpu`` tests run GPT-2 XL's four linear layers in fp16 / bf16.
"""

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import decode_linear as dl  # noqa: E402
from kernels.decode_linear import fused_linear, fused_linear_ref, use_fused_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


# The exhaustive small-shape sweeps are for the interpreter: on a GPU each of their ~100 (flags x config) variants
# would be a separate compile (over a minute); the gpu tests below cover the real shapes and every code path.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter sweep; see the gpu tests")


def _randn(*shape, dtype=torch.float32, seed=0, device=DEVICE, scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + offset).to(device=device, dtype=dtype)


def _problem(m, k, n, *, ln, bias, gelu, res, dtype=torch.float32, seed=0, device=DEVICE):
    """Random, never-zero inputs. x has a non-zero mean (the LN centring matters) and the weights are scaled so
    the pre-activation spans both sides of the GELU knee."""
    x = _randn(m, k, dtype=dtype, seed=seed, device=device, scale=2.0, offset=0.5)
    w = _randn(n, k, dtype=dtype, seed=seed + 1, device=device, scale=k ** -0.5)
    kwargs = dict(
        bias=_randn(n, dtype=dtype, seed=seed + 2, device=device) if bias else None,
        ln_weight=_randn(k, dtype=dtype, seed=seed + 3, device=device, scale=0.3, offset=1.0) if ln else None,
        ln_bias=_randn(k, dtype=dtype, seed=seed + 4, device=device, scale=0.3) if ln else None,
        activation="gelu_tanh" if gelu else None,
        residual=_randn(m, n, dtype=dtype, seed=seed + 5, device=device) if res else None,
    )
    return x, w, kwargs


def _rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def _check(y, ref, tol):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.isfinite(y).all(), "non-finite output (an element the kernel never wrote?)"
    err = _rel_err(y, ref)
    assert err <= tol, f"max relative error {err:.3g} > {tol}"


def _run_poisoned(x, w, kwargs, config):
    """Run with out= pre-filled with NaN, so any element the kernel fails to write shows up."""
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    y = fused_linear(x, w, **kwargs, out=out, config=config)
    assert y is out
    return y


# Small tiles, so that the CPU shapes span several N tiles and K chunks (none of them multiples of the tiles).
DOT_SMALL = {"path": "dot", "block_n": 16, "block_k": 32}
FMA_SMALL = {"path": "fma", "block_n": 16, "block_k": 32}
CPU_CONFIGS = {
    "dot": {**DOT_SMALL, "split": 1},
    "dot-split3-serial": {**DOT_SMALL, "split": 3, "split_mode": "serial"},
    "dot-split2-two_pass": {**DOT_SMALL, "split": 2, "split_mode": "two_pass"},
    "fma": {**FMA_SMALL, "split": 1},
    "fma-split3-serial": {**FMA_SMALL, "split": 3, "split_mode": "serial"},
    "fma-noprefetch-split2-two_pass": {**FMA_SMALL, "prefetch": False, "split": 2, "split_mode": "two_pass"},
}
COMBOS = list(itertools.product([False, True], repeat=4))  # (ln, bias, gelu, res)


@interpreter_only
@pytest.mark.parametrize("ln,bias,gelu,res", COMBOS, ids=lambda v: "1" if v else "0")
def test_every_fusion_combination(ln, bias, gelu, res):
    """All 16 prologue/epilogue combinations, each through the dot path (M=3) and the fma path (M=1), with and
    without split-K in both reduction modes."""
    for name, cfg in CPU_CONFIGS.items():
        m = 1 if cfg["path"] == "fma" else 3
        x, w, kwargs = _problem(m, 100, 48, ln=ln, bias=bias, gelu=gelu, res=res, seed=len(name))
        y = _run_poisoned(x, w, kwargs, cfg)
        _check(y, fused_linear_ref(x, w, **kwargs), 1e-4)


@interpreter_only
@pytest.mark.parametrize("k", [40, 64, 100])
@pytest.mark.parametrize("n", [24, 48, 130])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_shapes(m, n, k):
    """Every (M, N, K) with the full LN1/c_fc-style fusion, default config (the split heuristic; on the CPU it
    sees 4 "SMs") and one forced split."""
    x, w, kwargs = _problem(m, k, n, ln=True, bias=True, gelu=True, res=True, seed=m * 1000 + n * 10 + k)
    ref = fused_linear_ref(x, w, **kwargs)
    _check(_run_poisoned(x, w, kwargs, None), ref, 1e-4)
    split = {**(FMA_SMALL if m == 1 else DOT_SMALL), "split": 2}
    _check(_run_poisoned(x, w, kwargs, split), ref, 1e-4)


def test_split_modes_bitwise_equal_and_counters_rearmed():
    """Serial and two-pass reductions sum the partials in the same order: identical bits. The serial mode's
    arrival counters must be back at 0 after every launch (graph replays rely on it), and repeated calls are
    deterministic."""
    x, w, kwargs = _problem(5, 100, 130, ln=True, bias=True, gelu=True, res=True, seed=7)
    serial = fused_linear(x, w, **kwargs, config={**DOT_SMALL, "split": 4, "split_mode": "serial"})
    again = fused_linear(x, w, **kwargs, config={**DOT_SMALL, "split": 4, "split_mode": "serial"})
    two_pass = fused_linear(x, w, **kwargs, config={**DOT_SMALL, "split": 4, "split_mode": "two_pass"})
    assert torch.equal(serial, again) and torch.equal(serial, two_pass)
    counters = dl._COUNTERS[(x.device.type, x.device.index)]
    assert int(counters.abs().sum()) == 0


def test_more_splits_than_chunks_is_clamped():
    x, w, kwargs = _problem(2, 40, 24, ln=True, bias=True, gelu=False, res=False, seed=3)
    cfg = dl.resolve_config(2, 24, 40, DEVICE, {**DOT_SMALL, "split": 16})
    assert cfg["split"] == 2  # cdiv(40, 32) chunks
    _check(_run_poisoned(x, w, kwargs, {**DOT_SMALL, "split": 16}), fused_linear_ref(x, w, **kwargs), 1e-4)


def test_layernorm_large_offset():
    """Rows with a large common offset (|mean| >> std): the one-pass statistics are shifted by the row's first
    element, so they do not cancel catastrophically."""
    m, k, n = 3, 100, 24
    x = _randn(m, k, seed=11, offset=1000.0)
    w = _randn(n, k, seed=12, scale=k ** -0.5)
    g, b = _randn(k, seed=13, offset=1.0), _randn(k, seed=14)
    for cfg in (DOT_SMALL, {**FMA_SMALL, "split": 2}):
        xi = x if cfg["path"] == "dot" else x[:1]
        y = fused_linear(xi, w, ln_weight=g, ln_bias=b, config=cfg)
        _check(y, fused_linear_ref(xi, w, ln_weight=g, ln_bias=b), 1e-4)


def test_ln_without_bias_and_eps():
    x, w, _ = _problem(2, 64, 48, ln=False, bias=False, gelu=False, res=False, seed=21)
    g = _randn(64, seed=22, offset=1.0)
    y = fused_linear(x, w, ln_weight=g, ln_eps=0.5, config=DOT_SMALL)
    _check(y, fused_linear_ref(x, w, ln_weight=g, ln_eps=0.5), 1e-4)


def test_in_place_residual_and_batch_dims():
    """out may alias residual (hidden += proj(...)); x may carry leading dims."""
    x, w, kwargs = _problem(6, 64, 48, ln=False, bias=True, gelu=False, res=True, seed=31)
    ref = fused_linear_ref(x, w, **kwargs)
    hidden = kwargs.pop("residual").clone()
    y = fused_linear(x, w, **kwargs, residual=hidden, out=hidden, config={**DOT_SMALL, "split": 2})
    assert y is hidden
    _check(hidden, ref, 1e-4)
    y3 = fused_linear(x.view(2, 3, 64), w, kwargs["bias"], config=DOT_SMALL)
    assert y3.shape == (2, 3, 48)
    _check(y3.view(6, 48), fused_linear_ref(x, w, kwargs["bias"]), 1e-4)


def test_strided_x_rows():
    """x rows need only be contiguous within a row (e.g. a column slice of a wider buffer)."""
    base = _randn(4, 160, seed=41, offset=0.3)
    x = base[:, 30:130]
    assert x.stride() == (160, 1)
    w = _randn(24, 100, seed=42, scale=0.1)
    g, b = _randn(100, seed=43, offset=1.0), _randn(100, seed=44)
    y = fused_linear(x, w, ln_weight=g, ln_bias=b, config=DOT_SMALL)
    _check(y, fused_linear_ref(x, w, ln_weight=g, ln_bias=b), 1e-4)


def test_fp16_interpreted():
    x, w, kwargs = _problem(4, 64, 48, ln=True, bias=True, gelu=True, res=True, dtype=torch.float16, seed=51)
    y = _run_poisoned(x, w, kwargs, DOT_SMALL)
    _check(y, fused_linear_ref(x, w, **kwargs), 1e-2)


def test_empty_batch_predicate_and_errors():
    w = _randn(24, 40, seed=61)
    assert fused_linear(torch.empty(0, 40, device=DEVICE), w).shape == (0, 24)
    # The model routes only single-row steps through the kernel (MODEL_MAX_ROWS: measured faster only there).
    assert use_fused_linear(1, "cuda") and use_fused_linear(1, "cuda:0")
    assert not use_fused_linear(2, "cuda") and not use_fused_linear(1, "cpu") and not use_fused_linear(0, "cuda")
    with pytest.raises(AssertionError):
        fused_linear(_randn(17, 40, seed=62), w)
    with pytest.raises(ValueError):
        fused_linear(_randn(2, 40, seed=63), w, activation="relu")


# ---------------------------------------------------------------------------------------------------------------
# GPU: GPT-2 XL's four linear layers with the fusions the model uses for each.

XL_LAYERS = {
    "c_attn": (1600, 4800, dict(ln=True, bias=True, gelu=False, res=False)),
    "attn.c_proj": (1600, 1600, dict(ln=False, bias=True, gelu=False, res=True)),
    "c_fc": (1600, 6400, dict(ln=True, bias=True, gelu=True, res=False)),
    "mlp.c_proj": (6400, 1600, dict(ln=False, bias=True, gelu=False, res=True)),
}


@needs_gpu
@pytest.mark.parametrize("layer", list(XL_LAYERS))
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_xl_shapes(layer, m, dtype):
    k, n, flags = XL_LAYERS[layer]
    x, w, kwargs = _problem(m, k, n, **flags, dtype=dtype, seed=m + len(layer))
    ref = fused_linear_ref(x.float(), w.float(), **{key: (v.float() if torch.is_tensor(v) else v)
                                                  for key, v in kwargs.items()})
    y = _run_poisoned(x, w, kwargs, None)
    assert torch.isfinite(y).all()
    err = _rel_err(y, ref)
    assert err <= 1e-2, f"{layer} M={m} {dtype}: relative error {err:.3g}"


@needs_gpu
@pytest.mark.parametrize("cfg", [
    {"path": "dot", "split": 1}, {"path": "dot", "split": 5, "split_mode": "serial"},
    {"path": "dot", "split": 5, "split_mode": "two_pass"}, {"path": "fma", "split": 1},
    {"path": "fma", "split": 7, "split_mode": "serial"}, {"path": "fma", "split": 3, "prefetch": False},
], ids=str)
def test_gpu_paths_and_split_modes(cfg):
    """Every code path at a real shape, all fusions on; the two split-K reductions agree bit for bit."""
    k, n = 6400, 1600
    m = 1 if cfg["path"] == "fma" else 4
    x, w, kwargs = _problem(m, k, n, ln=True, bias=True, gelu=True, res=True, dtype=torch.float16, seed=5)
    ref = fused_linear_ref(x, w, **kwargs)
    y = _run_poisoned(x, w, kwargs, cfg)
    assert _rel_err(y, ref) <= 1e-2
    if cfg.get("split", 1) > 1:
        other = {**cfg, "split_mode": "two_pass" if cfg.get("split_mode", "serial") == "serial" else "serial"}
        assert torch.equal(y, fused_linear(x, w, **kwargs, config=other))


@needs_gpu
def test_gpu_cuda_graph_replay():
    """Captured split-K launches replay correctly many times (the arrival counters re-arm themselves)."""
    k, n, m = 6400, 1600, 4
    x, w, kwargs = _problem(m, k, n, ln=False, bias=True, gelu=False, res=True, dtype=torch.float16, seed=9)
    cfg = {"split": 8, "split_mode": "serial"}
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    fused_linear(x, w, **kwargs, out=out, config=cfg)  # warm-up: compile + allocate the workspace
    expect = out.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(3):
                fused_linear(x, w, **kwargs, out=out, config=cfg)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(20):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)
