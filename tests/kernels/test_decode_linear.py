"""Fused small-batch linear (LN prologue, bias / GELU / residual epilogue, split-K) vs its PyTorch reference.

On a CPU machine the kernel runs in the Triton interpreter at small, deliberately tile-unaligned shapes; the
``gpu`` tests run GPT-2 XL's four linear layers in fp16 / bf16.
"""

import itertools

import pytest
import torch

from tests.kernels.kernel_testing import DEVICE, interpreter_only, needs_gpu, randn as _randn, rel_err as _rel_err  # noqa: F401
from gpt2serve.kernels import decode_linear as dl  # noqa: E402
from gpt2serve.kernels.decode_linear import fused_linear, fused_linear_ref, use_fused_linear  # noqa: E402


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
BATCHED_SMALL = {"path": "batched", "block_n": 16, "block_k": 32}
BATCHED_CONFIGS = {
    "batched": {**BATCHED_SMALL, "split": 1},
    "batched-split3-serial": {**BATCHED_SMALL, "split": 3, "split_mode": "serial"},
    "batched-split2-two_pass": {**BATCHED_SMALL, "split": 2, "split_mode": "two_pass"},
}


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
@pytest.mark.parametrize("ln,bias,gelu,res", COMBOS, ids=lambda v: "1" if v else "0")
def test_batched_every_fusion_combination(ln, bias, gelu, res):
    """The batched path (1 < M <= 16): every prologue/epilogue combination at two batch sizes, among them 15
    and 16, where the LN sums' two extra B columns no longer fit in 16 and the tile pads to 32."""
    i = COMBOS.index((ln, bias, gelu, res))
    for m in ((2, 5, 10, 16)[i % 4], (3, 8, 15, 16)[(i // 4) % 4]):
        for name, cfg in BATCHED_CONFIGS.items():
            x, w, kwargs = _problem(m, 100, 48, ln=ln, bias=bias, gelu=gelu, res=res, seed=m + len(name))
            y = _run_poisoned(x, w, kwargs, cfg)
            _check(y, fused_linear_ref(x, w, **kwargs), 1e-4)


@interpreter_only
@pytest.mark.parametrize("m", [2, 7, 14, 16])
def test_batched_ln_without_bias(m):
    """LN with gamma only: the beta column of the MMA operand is all zeros."""
    x, w, _ = _problem(m, 100, 40, ln=False, bias=False, gelu=False, res=False, seed=70 + m)
    g = _randn(100, seed=71, scale=0.3, offset=1.0)
    for cfg in BATCHED_CONFIGS.values():
        y = fused_linear(x, w, ln_weight=g, ln_eps=0.25, config=cfg)
        _check(y, fused_linear_ref(x, w, ln_weight=g, ln_eps=0.25), 1e-4)


def test_batched_is_the_default_for_several_rows():
    """fused_linear routes 1 < M <= 16 to the batched path and keeps the tuned fma path for M = 1; the model
    routes up to MODEL_MAX_ROWS rows (10: where the batched path measured ahead of cuBLAS) through it."""
    for m in (2, 5, 10, 16):
        for k, n in ((1600, 4800), (1600, 1600), (1600, 6400), (6400, 1600), (100, 48)):
            assert dl.resolve_config(m, n, k, DEVICE)["path"] == "batched"
    assert dl.resolve_config(1, 4800, 1600, DEVICE)["path"] == "fma"
    assert dl.resolve_config(5, 48, 100, DEVICE, {"path": "dot"})["path"] == "dot"  # still selectable
    assert use_fused_linear(5, "cuda") and use_fused_linear(10, "cuda") and not use_fused_linear(11, "cuda")
    assert not use_fused_linear(5, "cpu")


def test_batched_split_modes_bitwise_equal_and_counters_rearmed():
    x, w, kwargs = _problem(5, 100, 130, ln=True, bias=True, gelu=True, res=True, seed=8)
    cfg = {**BATCHED_SMALL, "split": 4}
    serial = fused_linear(x, w, **kwargs, config={**cfg, "split_mode": "serial"})
    again = fused_linear(x, w, **kwargs, config={**cfg, "split_mode": "serial"})
    two_pass = fused_linear(x, w, **kwargs, config={**cfg, "split_mode": "two_pass"})
    assert torch.equal(serial, again) and torch.equal(serial, two_pass)
    _check(serial, fused_linear_ref(x, w, **kwargs), 1e-4)
    assert int(dl._COUNTERS[(x.device.type, x.device.index)].abs().sum()) == 0


def test_batched_layernorm_offsets_and_outliers():
    """The folded LN subtracts (mu - s) * sum(W g) in the epilogue. With a large common offset (|mean| >> std),
    and with an outlier as the row's first element, the shift s (mean of the first chunk) stays near mu, so
    neither the statistics nor that subtraction cancel; fp16 too, where g * (x - s) is rounded for the MMA."""
    m, k, n = 6, 100, 24
    g, b = _randn(k, seed=83, offset=1.0), _randn(k, seed=84)
    w = _randn(n, k, seed=82, scale=k ** -0.5)
    x_offset = _randn(m, k, seed=81, offset=1000.0)
    x_outlier = _randn(m, k, seed=85)
    x_outlier[:, 0] = 300.0
    x_outlier[:, 57] = -200.0
    for x in (x_offset, x_outlier):
        for cfg in (BATCHED_SMALL, {**BATCHED_SMALL, "split": 3}):
            _check(fused_linear(x, w, ln_weight=g, ln_bias=b, config=cfg),
                   fused_linear_ref(x, w, ln_weight=g, ln_bias=b), 1e-4)
    x16, w16, g16, b16 = (t.half() for t in (x_outlier, w, g, b))
    y = fused_linear(x16, w16, ln_weight=g16, ln_bias=b16, config={**BATCHED_SMALL, "split": 2})
    _check(y, fused_linear_ref(x16, w16, ln_weight=g16, ln_bias=b16), 1e-2)


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
    assert not use_fused_linear(dl.MODEL_MAX_ROWS + 1, "cuda") and not use_fused_linear(1, "cpu") and not use_fused_linear(0, "cuda")
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
@pytest.mark.parametrize("layer", list(XL_LAYERS))
@pytest.mark.parametrize("m", [2, 5, 10, 16])
@pytest.mark.parametrize("split_mode", ["serial", "two_pass"])
def test_gpu_batched_xl_shapes(layer, m, split_mode):
    """The batched path at GPT-2 XL shapes, fp16, the default tiles and split heuristic; both reductions give
    the same bits."""
    k, n, flags = XL_LAYERS[layer]
    x, w, kwargs = _problem(m, k, n, **flags, dtype=torch.float16, seed=3 * m + len(layer))
    ref = fused_linear_ref(x.float(), w.float(), **{key: (v.float() if torch.is_tensor(v) else v)
                                                  for key, v in kwargs.items()})
    cfg = {"path": "batched", "split_mode": split_mode}
    assert dl.resolve_config(m, n, k, x.device)["path"] == "batched"
    y = _run_poisoned(x, w, kwargs, cfg)
    err = _rel_err(y, ref)
    assert err <= 1e-2, f"{layer} M={m}: relative error {err:.3g}"
    if dl.resolve_config(m, n, k, x.device, cfg)["split"] > 1:
        other = {**cfg, "split_mode": "two_pass" if split_mode == "serial" else "serial"}
        assert torch.equal(y, fused_linear(x, w, **kwargs, config=other))


@needs_gpu
def test_gpu_batched_cuda_graph_replay():
    """Captured batched split-K launches with the LN prologue replay correctly (counters re-arm)."""
    k, n, m = 1600, 4800, 5
    x, w, kwargs = _problem(m, k, n, ln=True, bias=True, gelu=True, res=True, dtype=torch.float16, seed=19)
    cfg = {"path": "batched", "split": 4, "split_mode": "serial"}
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    fused_linear(x, w, **kwargs, out=out, config=cfg)
    expect = out.clone()
    assert _rel_err(expect, fused_linear_ref(x, w, **kwargs)) <= 1e-2
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(3):
                fused_linear(x, w, **kwargs, out=out, config=cfg)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(10):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)


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
