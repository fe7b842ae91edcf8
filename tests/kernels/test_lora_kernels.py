"""Multi-LoRA shrink / expand kernels (kernels/lora.py) vs their PyTorch reference.

On a CPU machine the kernels run in the Triton interpreter at small, tile-unaligned shapes with small tiles (so
every shape spans several row tiles, K chunks and N tiles); the ``gpu`` tests run GPT-2 XL's four linear layers
in fp16 and capture the decode path in a CUDA graph.
"""


import pytest
import torch

from tests.kernels.kernel_testing import DEVICE, interpreter_only, needs_gpu, randn as _randn, rel_err as _rel_err  # noqa: F401
from gpt2serve.kernels import lora  # noqa: E402
from gpt2serve.kernels.decode_linear import LoraDelta, fused_linear, fused_linear_ref  # noqa: E402
from gpt2serve.kernels.lora import (  # noqa: E402
    apply_lora, lora_delta_ref, lora_expand, lora_segments, lora_shrink, lora_shrink_partials,
)


def _slots(t, s, seed, device=DEVICE):
    """Interleaved (unsorted) slot ids in [-1, S) with at least one row without adapter once T > 1, and every
    slot used when T allows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, s, (t,), generator=gen, dtype=torch.int32)
    if t > s + 1:
        ids[: s + 1] = torch.randperm(s + 1, generator=gen).to(torch.int32) - 1
        ids = ids[torch.randperm(t, generator=gen)]
    return ids.to(device)


def _problem(t, k, n, r, s, *, dtype=torch.float32, seed=0, device=DEVICE):
    """Random, never-zero inputs sized so that the delta and y0 are both O(1): neither hides the other."""
    x = _randn(t, k, dtype=dtype, seed=seed, device=device, scale=2.0, offset=0.5)
    a = _randn(s, r, k, dtype=dtype, seed=seed + 1, device=device, scale=k ** -0.5)
    b = _randn(s, n, r, dtype=dtype, seed=seed + 2, device=device, scale=r ** -0.5)
    y0 = _randn(t, n, dtype=dtype, seed=seed + 3, device=device)
    return x, a, b, y0


def _check_apply(x, a, b, ids, y0, config, tol, column_offset=0):
    """apply_lora into a copy of y0 vs y0 + the reference delta; rows without adapter (and every column outside
    the slice) must come back bit-identical."""
    n = b.shape[1]
    y = y0.clone()
    out = apply_lora(x, y, a, b, ids, column_offset=column_offset, config=config)
    assert out is y
    assert torch.isfinite(y).all()
    cols = slice(column_offset, column_offset + n)
    ref = y0.to(torch.float32, copy=True)  # .float() of an fp32 tensor would alias y0
    ref[:, cols] += lora_delta_ref(x, a, b, ids)
    err = _rel_err(y, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    none = (ids < 0) | (ids >= a.shape[0])
    assert torch.equal(y[none], y0[none]), "rows without adapter changed"
    assert torch.equal(y[:, :column_offset], y0[:, :column_offset])
    assert torch.equal(y[:, column_offset + n:], y0[:, column_offset + n:])
    return y


# Small tiles so the CPU shapes span several tiles in every dimension (none of the shapes a multiple of them).
SMALL = {"shrink": {"block_m": 16, "block_k": 32}, "expand": {"block_m": 16, "block_n": 32}}
CONFIGS = {
    "masked": {**SMALL, "path": "masked", "shrink": {**SMALL["shrink"], "split": 1}},
    "sorted-split3": {**SMALL, "path": "sorted", "shrink": {**SMALL["shrink"], "split": 3}},
    "auto": {},
}
SHAPES = [(100, 130, 16, 3), (64, 192, 8, 4), (72, 40, 64, 2)]  # (K, N, R, S)


@pytest.mark.parametrize("t", [1, 5, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K%d-N%d-R%d-S%d" % s)
def test_apply_lora_matches_reference(t, shape):
    """Both row-tiling paths (and the default choice) at every (T, K, N, R, S)."""
    k, n, r, s = shape
    x, a, b, y0 = _problem(t, k, n, r, s, seed=t + k)
    ids = _slots(t, s, seed=t * 7 + n)
    if t == 1:
        ids.fill_(s - 1)
    for cfg in CONFIGS.values():
        _check_apply(x, a, b, ids, y0, cfg, 1e-4)


def test_paths_agree_and_repeat_bitwise():
    """Same inputs through both paths agree to fp32 rounding; each path is deterministic (no atomics), and the
    split-K partials sum to what one split gives up to rounding."""
    k, n, r, s, t = 100, 48, 16, 4, 40
    x, a, b, y0 = _problem(t, k, n, r, s, seed=5)
    ids = _slots(t, s, seed=6)
    ys = {}
    for name, cfg in CONFIGS.items():
        ys[name] = _check_apply(x, a, b, ids, y0, cfg, 1e-4)
        assert torch.equal(ys[name], _check_apply(x, a, b, ids, y0, cfg, 1e-4))
    assert _rel_err(ys["masked"], ys["sorted-split3"]) <= 1e-6


def test_no_adapter_rows_only_and_single_slot():
    k, n, r, s, t = 64, 40, 8, 3, 20
    x, a, b, y0 = _problem(t, k, n, r, s, seed=11)
    for ids in (torch.full((t,), -1, dtype=torch.int32), torch.full((t,), 2, dtype=torch.int32)):
        for cfg in CONFIGS.values():
            y = y0.clone()
            apply_lora(x, y, a, b, ids.to(DEVICE), config=cfg)
            if ids[0] < 0:
                assert torch.equal(y, y0)
            else:
                assert _rel_err(y, y0 + lora_delta_ref(x, a, b, ids)) <= 1e-4


def test_rank_padding():
    """A rank-4 adapter stored in an R = 8 stack (zero padding) gives its unpadded math; its neighbour in the
    stack uses the full rank."""
    k, n, t = 100, 72, 21
    x, a, b, y0 = _problem(t, k, n, 8, 2, seed=21)
    a4 = _randn(4, k, seed=22, scale=k ** -0.5)
    b4 = _randn(n, 4, seed=23, scale=0.5)
    a[1].zero_()
    b[1].zero_()
    a[1, :4] = a4
    b[1, :, :4] = b4
    ids = _slots(t, 2, seed=24)
    rows1 = ids == 1
    unpadded = y0.clone()
    unpadded[rows1] += (x[rows1] @ a4.T) @ b4.T
    for cfg in CONFIGS.values():
        y = _check_apply(x, a, b, ids, y0, cfg, 1e-4)
        assert _rel_err(y[rows1], unpadded[rows1]) <= 1e-4


def test_column_offset():
    """One call per slice of a fused output (GPT-2's c_attn: q | k | v); the columns outside stay untouched."""
    k, n, r, s, t = 64, 48, 16, 3, 17
    x, a, b, _ = _problem(t, k, n, r, s, seed=31)
    y0 = _randn(t, 3 * n, seed=32)
    ids = _slots(t, s, seed=33)
    for off in (0, n, 2 * n, 5):
        for cfg in (CONFIGS["masked"], CONFIGS["sorted-split3"]):
            _check_apply(x, a, b, ids, y0, cfg, 1e-4, column_offset=off)
    with pytest.raises(AssertionError):
        apply_lora(x, y0.clone(), a, b, ids, column_offset=2 * n + 1)


def test_strided_rows():
    """x and y need only contiguous columns: x a slice of a wider buffer, y a slice of a fused output."""
    k, n, r, s, t = 64, 40, 8, 2, 9
    _, a, b, _ = _problem(t, k, n, r, s, seed=41)
    x = _randn(t, k + 30, seed=42, offset=0.3)[:, 10:10 + k]
    y0 = _randn(t, n + 7, seed=43)
    ids = _slots(t, s, seed=44)
    _check_apply(x, a, b, ids, y0, CONFIGS["sorted-split3"], 1e-4, column_offset=7)


def test_leading_dims():
    k, n, r, s = 64, 40, 8, 3
    x, a, b, y0 = _problem(6, k, n, r, s, seed=45)
    ids = _slots(6, s, seed=46)
    y = y0.clone().view(2, 3, n)
    assert apply_lora(x.view(2, 3, k), y, a, b, ids.view(2, 3), config=CONFIGS["sorted-split3"]) is y
    assert _rel_err(y.view(6, n), y0 + lora_delta_ref(x, a, b, ids)) <= 1e-4


def test_shrink_and_expand_standalone():
    """lora_shrink returns fp32 h with zero rows for rows without adapter (split-K partials summed);
    lora_expand adds h @ B.T in place."""
    k, n, r, s, t = 100, 56, 16, 3, 19
    x, a, b, y0 = _problem(t, k, n, r, s, seed=51)
    ids = _slots(t, s, seed=52)
    ids[3] = s  # out of range: treated as no adapter, like -1
    ok = (ids >= 0) & (ids < s)
    h_ref = torch.zeros(t, r)
    h_ref[ok] = torch.einsum("tk,trk->tr", x[ok], a[ids[ok].long()])
    for cfg in CONFIGS.values():
        h = lora_shrink(x, a, ids, config=cfg)
        assert h.dtype == torch.float32 and h.shape == (t, r)
        assert torch.equal(h[~ok], torch.zeros_like(h[~ok]))
        assert _rel_err(h, h_ref) <= 1e-5
        y = y0.clone()
        lora_expand(h, b, ids, y, config=cfg)
        assert torch.equal(y[~ok], y0[~ok])
        assert _rel_err(y, y0 + lora_delta_ref(x, a, b, ids)) <= 1e-4


def test_segments():
    """The grouping is a stable counting sort by slot; rows without adapter (-1 or >= S) form the last bucket;
    int64 slot ids work too. Segments computed once serve several layers' calls."""
    s = 4
    ids = torch.tensor([2, -1, 0, 2, 5, 1, 0, -1, 2, 3, 3, 0], dtype=torch.int32, device=DEVICE)
    for dt in (torch.int32, torch.int64):
        seg = lora_segments(ids.to(dt), s)
        key = torch.where((ids < 0) | (ids >= s), s, ids).cpu()
        expect = torch.sort(key, stable=True).indices.to(torch.int32)
        assert torch.equal(seg.order.cpu(), expect)
        assert seg.starts.cpu().tolist() == [0, 3, 4, 7, 9, 12]
    # Longer than the kernel's row chunk, so the per-bucket offsets carry across chunks.
    long_ids = _slots(1300, 5, seed=61)
    seg = lora_segments(long_ids, 5)
    key = torch.where(long_ids < 0, 5, long_ids).cpu()
    assert torch.equal(seg.order.cpu(), torch.sort(key, stable=True).indices.to(torch.int32))
    assert torch.equal(seg.starts.cpu()[1:], torch.bincount(key, minlength=7).cumsum(0)[:6].to(torch.int32))
    # One grouping, two layers of different shapes.
    t = 24
    ids = _slots(t, 3, seed=62)
    seg = lora_segments(ids, 3)
    for k, n, r in ((64, 40, 8), (40, 96, 8)):
        x, a, b, y0 = _problem(t, k, n, r, 3, seed=k + n)
        y = y0.clone()
        apply_lora(x, y, a, b, ids, segments=seg, config={**SMALL, "path": "sorted"})
        assert _rel_err(y, y0 + lora_delta_ref(x, a, b, ids)) <= 1e-4


def test_fp16_interpreted():
    """16-bit stacks: h enters the expand MMA as hi + lo fp16 parts."""
    k, n, r, s, t = 64, 48, 16, 3, 21
    x, a, b, y0 = _problem(t, k, n, r, s, dtype=torch.float16, seed=71)
    ids = _slots(t, s, seed=72)
    for cfg in (CONFIGS["masked"], CONFIGS["sorted-split3"]):
        _check_apply(x, a, b, ids, y0, cfg, 1e-3)


def test_config_resolution_and_empty():
    dev = torch.device(DEVICE)
    assert lora.resolve_config(1, 1600, 4800, 16, 4, dev)["path"] == "masked"
    assert lora.resolve_config(lora.MASKED_MAX_ROWS, 1600, 4800, 16, 4, dev)["path"] == "masked"
    assert lora.resolve_config(lora.MASKED_MAX_ROWS + 1, 1600, 4800, 16, 4, dev)["path"] == "sorted"
    cfg = lora.resolve_config(2048, 1600, 4800, 8, 4, dev)
    assert cfg["block_r"] == 16 and cfg["shrink"]["block_m"] == 64  # rank 8 padded to the MMA's 16
    assert lora.resolve_config(3, 100, 48, 16, 2, dev, {"shrink": {"split": 99, "block_k": 32}})["shrink"]["split"] == 4
    x, a, b, _ = _problem(0, 64, 40, 8, 2)
    y = torch.empty(0, 40, device=DEVICE)
    assert apply_lora(x, y, a, b, torch.empty(0, dtype=torch.int32, device=DEVICE)) is y
    assert lora_shrink(x, a, torch.empty(0, dtype=torch.int32, device=DEVICE)).shape == (0, 8)


def _layernorm(x, g, b, eps=1e-5):
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), g.float(), None if b is None else b.float(), eps)


def _ln_params(k, seed, dtype=torch.float32):
    return (_randn(k, dtype=dtype, seed=seed, scale=0.3, offset=1.0), _randn(k, dtype=dtype, seed=seed + 1, scale=0.2))


@pytest.mark.parametrize("t", [1, 5, 20])
@pytest.mark.parametrize("shape", [(100, 16, 3), (72, 8, 2)], ids=lambda s: "K%d-R%d-S%d" % s)
def test_shrink_with_layernorm(t, shape):
    """The shrink normalises x itself (the decode path hands it the layer's raw input): h = LN(x) @ A[s].T on both
    row-tiling paths, split-K or not, LN with and without beta; rows of an offset far from zero and an outlier
    feature, so that the statistics must be taken around the mean."""
    k, r, s = shape
    x, a, _, _ = _problem(t, k, 8, r, s, seed=t + k)
    x = x + 40.0
    x[:, 3] += 300.0
    g, beta = _ln_params(k, seed=k)
    ids = _slots(t, s, seed=t)
    ok = (ids >= 0) & (ids < s)
    for b in (beta, None):
        xn = _layernorm(x, g, b, 0.1)
        h_ref = torch.zeros(t, r)
        h_ref[ok] = torch.einsum("tk,trk->tr", xn[ok], a[ids[ok].long()])
        for cfg in CONFIGS.values():
            h = lora_shrink(x, a, ids, ln_weight=g, ln_bias=b, ln_eps=0.1, config=cfg)
            assert torch.equal(h[~ok], torch.zeros_like(h[~ok]))
            assert _rel_err(h, h_ref) <= 1e-5


# fused_linear's paths, split-K modes included, at tiles smaller than the shapes (none of which they divide).
EPILOGUE_CONFIGS = {
    "fma": {"path": "fma", "block_n": 4, "block_k": 32, "split": 1},
    "fma-split3-serial": {"path": "fma", "block_n": 4, "block_k": 32, "split": 3, "split_mode": "serial"},
    "fma-split3-two_pass": {"path": "fma", "block_n": 4, "block_k": 32, "split": 3, "split_mode": "two_pass"},
    "batched": {"path": "batched", "block_n": 16, "block_k": 32, "split": 1},
    "batched-split2-serial": {"path": "batched", "block_n": 32, "block_k": 32, "split": 2, "split_mode": "serial"},
    "batched-split2-two_pass": {"path": "batched", "block_n": 16, "block_k": 32, "split": 2,
                                "split_mode": "two_pass"},
    "dot-split2": {"path": "dot", "block_n": 16, "block_k": 32, "split": 2},
}


def _decode_layer_case(m, k, n, r, s, seed, dtype=torch.float32):
    x, a, b, res = _problem(m, k, n, r, s, dtype=dtype, seed=seed)
    w = _randn(n, k, dtype=dtype, seed=seed + 5, scale=k ** -0.5)
    bias = _randn(n, dtype=dtype, seed=seed + 6, scale=0.1)
    g, beta = _ln_params(k, seed=seed + 7, dtype=dtype)
    ids = _slots(m, s, seed=seed + 8)
    if m == 1:
        ids.fill_(s - 1)
    return x, a, b, res, w, bias, g, beta, ids


@pytest.mark.parametrize("m,k,n", [pytest.param(1, 100, 70, marks=pytest.mark.slow), (3, 72, 40), (7, 100, 52)])
def test_fused_linear_adds_the_lora_delta_before_the_activation(m, k, n, monkeypatch):
    """fused_linear(lora=...) == GELU(LN(x) @ W.T + bias + lora(LN(x))) + residual, with h given (LN-folded
    partials of a separate shrink) or computed by the kernel's own producers (several of them here, one with no
    chunk at all), on every fused_linear path the row count allows; rows without adapter come back bit-identical
    to the layer without LoRA; the reference fused_linear_ref(lora=...) agrees."""
    from gpt2serve.kernels import decode_linear

    monkeypatch.setattr(decode_linear, "LORA_PRODUCER_MIN_K", 32)
    assert decode_linear.lora_producers(k) == k // 32
    x, a, b, res, w, bias, g, beta, ids = _decode_layer_case(m, k, n, 8, 3, seed=m + n)
    xn = _layernorm(x, g, beta)
    ref = torch.nn.functional.gelu(xn @ w.T + bias + lora_delta_ref(xn, a, b, ids), approximate="tanh") + res
    h_parts = lora_shrink_partials(x, a, ids, ln_weight=g, ln_bias=beta, config=CONFIGS["sorted-split3"])
    given = LoraDelta(b, ids, h_parts=h_parts, ln_eps=1e-5)
    in_kernel = LoraDelta(b, ids, lora_a=a)
    kw = dict(ln_weight=g, ln_bias=beta, activation="gelu_tanh", residual=res)
    assert _rel_err(fused_linear_ref(x, w, bias, **kw, lora=given), ref) <= 1e-5
    none = ids < 0
    for name, cfg in EPILOGUE_CONFIGS.items():
        if name.startswith("fma") != (m == 1):
            continue
        plain = fused_linear(x, w, bias, **kw, config=cfg)
        for delta in (given, in_kernel):
            y = fused_linear(x, w, bias, **kw, lora=delta, config=cfg)
            assert _rel_err(y, ref) <= 1e-5, name
            assert torch.equal(y[none], plain[none]), name
            assert not _lora_counters().any(), "the in-kernel producers' counters were not re-armed"


def test_fused_linear_lora_without_norm_and_fp16():
    """The c_proj shape of the fusion (no LN, residual only; h from a plain shrink's split-K partials or from
    in-kernel producers, with the two-pass split mode turned serial for them), and 16-bit stacks, whose delta
    enters the MMA as hi + lo parts."""
    m, k, n, r, s = 5, 300, 48, 16, 3
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x, a, b, res, w, bias, _, _, ids = _decode_layer_case(m, k, n, r, s, seed=81, dtype=dtype)
        h_parts = lora_shrink_partials(x, a, ids, config=CONFIGS["sorted-split3"])
        assert h_parts.shape == (3, m, r)
        ref = x.float() @ w.float().T + bias.float() + lora_delta_ref(x, a, b, ids) + res.float()
        for cfg in (EPILOGUE_CONFIGS["batched-split2-two_pass"], EPILOGUE_CONFIGS["dot-split2"]):
            for delta in (LoraDelta(b, ids, h_parts=h_parts), LoraDelta(b, ids, lora_a=a)):
                y = fused_linear(x, w, bias, residual=res, lora=delta, config=cfg)
                assert y.dtype == dtype and _rel_err(y, ref) <= tol
                assert not _lora_counters().any()


def _lora_counters():
    """The in-kernel producers' two counters (zero between launches)."""
    from gpt2serve.kernels import decode_linear

    return torch.cat([torch.zeros(0, dtype=torch.int32)] + [c[-2:].cpu() for c in decode_linear._COUNTERS.values()])


def test_linear_applies_lora_only_where_targeted():
    """A Linear runs LoRA only when some loaded adapter targets it (``lora_targeted``, marked by the runner):
    others skip the kernels, whatever their slot stacks hold (zeros in the engine)."""
    from gpt2serve.engine.layers.linear import Linear

    k, n, r, s, t = 24, 20, 4, 2, 5
    x, a, b, _ = _problem(t, k, n, r, s, seed=91, device="cpu")
    layer = Linear(k, n)
    layer.weight.data = _randn(n, k, seed=92, device="cpu")
    layer.bias.data = _randn(n, seed=93, device="cpu")
    layer.lora_a, layer.lora_b = a, b
    ids = _slots(t, s, seed=94, device="cpu")
    plain = layer(x)
    assert torch.equal(layer(x, lora_slots=ids), plain)
    layer.lora_targeted = True
    assert _rel_err(layer(x, lora_slots=ids), plain + lora_delta_ref(x, a, b, ids)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# GPU: GPT-2 XL's four linear shapes, 4 resident adapters of rank 16.

XL_SHAPES = {"c_attn": (1600, 4800), "attn.c_proj": (1600, 1600), "c_fc": (1600, 6400), "mlp.c_proj": (6400, 1600)}


@needs_gpu
@pytest.mark.parametrize("layer", list(XL_SHAPES))
@pytest.mark.parametrize("t", [1, 8, 64, 2048])
def test_gpu_xl_shapes(layer, t):
    k, n = XL_SHAPES[layer]
    x, a, b, y0 = _problem(t, k, n, 16, 4, dtype=torch.float16, seed=t + n)
    ids = _slots(t, 4, seed=t)
    if t == 1:
        ids.fill_(2)
    for path in ("auto", "masked", "sorted") if t <= 64 else ("auto",):
        _check_apply(x, a, b, ids, y0, {"path": path}, 1e-3)


@needs_gpu
@pytest.mark.parametrize("t", [8, 300])
def test_gpu_bf16_and_fp32(t):
    k, n = XL_SHAPES["c_fc"]
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        x, a, b, y0 = _problem(t, k, n, 16, 4, dtype=dtype, seed=t)
        _check_apply(x, a, b, _slots(t, 4, seed=t + 1), y0, None, tol)


@needs_gpu
@pytest.mark.parametrize("t,path", [(8, "masked"), (64, "sorted")])
def test_gpu_cuda_graph_replay(t, path):
    """Capture y = y0; apply_lora(...) (with the grouping inside the graph on the sorted path), then replay with
    new slot_ids and x written in place: results follow the new inputs."""
    k, n, s = 1600, 4800, 4
    x, a, b, y0 = _problem(t, k, n, 16, s, dtype=torch.float16, seed=90)
    ids = _slots(t, s, seed=91)
    y = torch.empty_like(y0)
    cfg = {"path": path}

    def step():
        y.copy_(y0)
        segs = lora_segments(ids, s) if path == "sorted" else None
        apply_lora(x, y, a, b, ids, segments=segs, config=cfg)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for i in range(4):
        ids.copy_(_slots(t, s, seed=100 + i))
        x.copy_(_randn(t, k, dtype=torch.float16, seed=200 + i, scale=2.0))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = y0.float() + lora_delta_ref(x, a, b, ids)
        assert _rel_err(y, ref) <= 1e-3
        none = ids < 0
        assert torch.equal(y[none], y0[none])


# GPT-2's fusion of each decode layer: (LayerNorm before, activation, residual after).
XL_FUSION = {"c_attn": (True, None, False), "attn.c_proj": (False, None, True), "c_fc": (True, "gelu_tanh", False),
             "mlp.c_proj": (False, None, True)}


@needs_gpu
@pytest.mark.parametrize("layer", list(XL_FUSION))
def test_gpu_decode_layers_in_a_graph(layer):
    """Each XL layer as the decode graphs run it (Linear under capture: one fused linear whose producer programs
    compute the LN-folded shrink and whose epilogue adds the delta) at 1, 4 and 10 rows, against the fp32
    reference; replayed with new slots and x written in place (the producers' counters re-armed after every
    replay); rows without adapter bit-identical to the same graph without LoRA."""
    from gpt2serve.engine.layers.basic import LayerNorm
    from gpt2serve.engine.layers.linear import Linear
    from gpt2serve.kernels.decode_linear import reserve_scratch

    reserve_scratch("cuda")  # as DecodeGraphs does: the in-kernel producers' counters exist before capture
    k, n = XL_SHAPES[layer]
    has_ln, act, has_res = XL_FUSION[layer]
    s, r = 4, 16
    lin = Linear(k, n).to("cuda", torch.float16)
    lin.weight.data = _randn(n, k, dtype=torch.float16, seed=1, scale=k ** -0.5)
    lin.bias.data = _randn(n, dtype=torch.float16, seed=2, scale=0.1)
    lin.lora_a = _randn(s, r, k, dtype=torch.float16, seed=3, scale=k ** -0.5)
    lin.lora_b = _randn(s, n, r, dtype=torch.float16, seed=4, scale=r ** -0.5)
    lin.lora_targeted = True
    norm = LayerNorm(k, 1e-5).to("cuda", torch.float16)
    norm.weight.data, norm.bias.data = _ln_params(k, seed=5, dtype=torch.float16)
    for t in (1, 4, 10):
        x = _randn(t, k, dtype=torch.float16, seed=t, scale=2.0, offset=0.3)
        res = _randn(t, n, dtype=torch.float16, seed=t + 1)
        ids = _slots(t, s, seed=t + 2)

        def forward(slots):
            return lin(x, norm=norm if has_ln else None, activation=act, residual=res if has_res else None,
                       lora_slots=slots)

        graphs = {}
        for key, slots in (("lora", ids), ("plain", None)):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward(slots)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward(slots)
            graphs[key] = (graph, out)
        for i in range(3):
            if i:
                ids.copy_(_slots(t, s, seed=300 + i))
                x.copy_(_randn(t, k, dtype=torch.float16, seed=400 + i, scale=2.0, offset=0.3))
            for graph, _ in graphs.values():
                graph.replay()
            torch.cuda.synchronize()
            h = _layernorm(x, norm.weight, norm.bias) if has_ln else x.float()
            ref = h @ lin.weight.float().T + lin.bias.float() + lora_delta_ref(h, lin.lora_a, lin.lora_b, ids)
            ref = torch.nn.functional.gelu(ref, approximate="tanh") if act else ref
            ref = ref + res.float() if has_res else ref
            y, plain = graphs["lora"][1], graphs["plain"][1]
            assert _rel_err(y, ref) <= 1e-3, (t, i)
            none = ids < 0
            assert torch.equal(y[none], plain[none])
            assert not _lora_counters().any(), "the producers' counters were not re-armed"


@needs_gpu
def test_gpu_one_grouping_per_step(monkeypatch):
    """Above MASKED_MAX_ROWS the layers of a step share one lora_segments launch (keyed by the step's slot ids
    tensor), and a new step's tensor gets its own."""
    from gpt2serve.engine.layers.linear import Linear

    calls = []
    real = lora.lora_segments
    monkeypatch.setattr(lora, "lora_segments", lambda *a: calls.append(1) or real(*a))
    k, n, r, s, t = 64, 48, 16, 3, 40
    x, a, b, _ = _problem(t, k, n, r, s, dtype=torch.float16, seed=97)
    lin = Linear(k, n).to("cuda", torch.float16)
    lin.weight.data = _randn(n, k, dtype=torch.float16, seed=98)
    lin.bias.data.zero_()
    lin.lora_a, lin.lora_b, lin.lora_targeted = a, b, True
    for step in range(2):
        ids = _slots(t, s, seed=step)
        for _ in range(3):
            y = lin(x, lora_slots=ids)
        assert len(calls) == step + 1
        ref = x.float() @ lin.weight.float().T + lora_delta_ref(x, a, b, ids)
        assert _rel_err(y, ref) <= 1e-3
