"""Multi-LoRA shrink / expand kernels (kernels/lora.py) vs their PyTorch reference.

On a CPU machine the kernels run in the Triton interpreter at small, tile-unaligned shapes with small tiles (so
every shape spans several row tiles, K chunks and N tiles); the ``gpu`` tests run GPT-2 XL's four linear layers
in fp16 and capture the decode path in a CUDA graph.
"""


import pytest
import torch

from tests.kernels.kernel_testing import DEVICE, interpreter_only, needs_gpu, randn as _randn, rel_err as _rel_err  # noqa: F401
from kernels import lora  # noqa: E402
from kernels.lora import apply_lora, lora_delta_ref, lora_expand, lora_segments, lora_shrink  # noqa: E402


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
